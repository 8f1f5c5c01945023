"""Failures under Ray Train: a worker process SIGKILLed mid-run. With ``scaling.max_failures=1``
the worker group restarts from the latest checkpoint, finishes every epoch and keeps one MLflow
run (FINISHED, each epoch once in the history); with ``max_failures=0`` the fit fails with a
message that says what to do, its MLflow run is FAILED, and doing what it says (``montage train
--resume s3://...``, the run on object storage) finishes the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import mlflow
import pytest

from montage.launch.session import train_worker_pids
from montage.launch.train import fit_ray
from montage.platform.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILLs a Ray Train worker process"),
]
log = logging.getLogger(__name__)


class Killer(threading.Thread):
    """SIGKILLs one training worker as soon as the run's first checkpoint is on storage (``stored()``)."""

    def __init__(self, stored: Callable[[], bool], every: float) -> None:
        super().__init__(daemon=True)
        self.stored, self.every, self.killed_at, self.pid, self.stop = stored, every, 0.0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.stored():
                pids = train_worker_pids()
                if pids:
                    self.pid = pids[-1]
                    os.kill(self.pid, signal.SIGKILL)
                    self.killed_at = time.time()
                    return
            time.sleep(self.every)


def _fit_killed(cfg, stored: Callable[[], bool], every: float = 0.05):
    killer = Killer(stored, every)
    killer.start()
    try:
        out = fit_ray(cfg)
    finally:
        killer.stop.set()
    assert killer.pid, "no worker was killed (the run ended before its first checkpoint was seen?)"
    return out, killer


def _one_run(cfg):
    client = mlflow.MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("montage-segmentation")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    return client, runs[0]


def test_killed_worker_restarts_from_checkpoint_into_one_mlflow_run(ray_session, seg_config, tmp_path: Path) -> None:
    cfg = seg_config(
        "scaling.workers=2", "scaling.max_failures=1", "train.epochs=4", "data.synthetic_train=384", "run.name=kill"
    )
    out, killer = _fit_killed(cfg, lambda: any((tmp_path / "runs" / "kill").glob("checkpoint_*")))
    assert out.error is None, out.error
    assert out.restarts == 1
    assert out.metrics["epoch"] == 4
    assert load_checkpoint(out.checkpoint, task="segmentation")["epoch"] == 4

    client, run = _one_run(cfg)
    assert run.info.status == "FINISHED" and run.info.run_id == out.mlflow_run_id
    history = client.get_metric_history(run.info.run_id, "epoch")
    assert sorted(int(m.step) for m in history) == [1, 2, 3, 4]  # every epoch once, none redone twice
    assert run.data.tags["montage.starts"] == "2"
    # the figure the README quotes: kill → first epoch finished after the restart
    after = [m.timestamp / 1000 for m in history if m.timestamp / 1000 > killer.killed_at]
    log.warning("restart: first epoch after the kill done %.1f s later", min(after) - killer.killed_at)


def test_killed_worker_without_restarts_fails_clearly_and_resumes_from_the_bucket(
    ray_session, seg_config, tmp_path: Path, s3_endpoint, capsys
) -> None:
    """The run on object storage (moto's S3 server): without restarts the fit fails, its MLflow run is
    FAILED and the error says ``--resume s3://...``; ``montage train --resume s3://...`` then finishes the
    run from the bucket's latest checkpoint, into the same MLflow run, and the bucket keeps
    ``scaling.keep_checkpoints`` (2) best checkpoints by the task's metric plus the latest."""
    from montage.cli import main

    bucket = s3_endpoint.bucket("faults")
    # one worker (the 2-worker teardown after a lost worker is the test above's): the failure and the resume are
    # the point here
    overrides = ["scaling.workers=1", "train.epochs=4", "data.synthetic_train=384", f"run.storage=s3://{bucket}/runs",
                 f"run.storage_endpoint={s3_endpoint.url}"]  # fmt: skip
    cfg = seg_config(*overrides, "scaling.max_failures=0", "run.name=dead")
    # registered: Ray Train writes its checkpoint list once a checkpoint is complete on the bucket
    snapshot = "runs/dead/checkpoint_manager_snapshot.json"
    out, _ = _fit_killed(cfg, lambda: bool(s3_endpoint.keys(bucket, snapshot)), every=0.3)
    assert out.error is not None
    assert "worker process was lost" in out.error and "max_failures=0" in out.error
    assert f"--resume s3://{bucket}/runs/dead" in out.error
    _, run = _one_run(cfg)
    assert run.info.status == "FAILED" and "montage.error" in run.data.tags

    capsys.readouterr()
    args = ["train", "segmentation", "--config", "segmentation-smoke", *overrides,
            f"tracking.uri={cfg.tracking.uri}", f"tracking.artifacts={cfg.tracking.artifacts}"]  # fmt: skip
    # the resumed epochs at 2 steps each: what is checked is where they land, not what they learn
    assert main([*args, "train.max_steps=2", "--resume", f"s3://{bucket}/runs/dead"]) == 0
    shown = json.loads(capsys.readouterr().out)
    client, run = _one_run(cfg)
    assert run.info.status == "FINISHED" and run.data.tags["montage.starts"] == "2"
    assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")) == [1, 2, 3, 4]
    iou = {int(m.step): m.value for m in client.get_metric_history(run.info.run_id, "val/iou")}
    best_two = set(sorted(iou, key=lambda e: -iou[e])[:2])
    kept = {c["epoch"]: c["path"] for c in shown["checkpoints"]}
    assert set(kept) == best_two | {4}, (iou, kept)
    in_bucket = {k.split("/")[2] for k in s3_endpoint.keys(bucket, "runs/dead/checkpoint_") if k.count("/") > 2}
    assert in_bucket == {p.rstrip("/").rsplit("/", 1)[-1] for p in kept.values()}, (in_bucket, kept)
    assert all(p.startswith(f"s3://{bucket}/runs/dead/checkpoint_") for p in kept.values())
