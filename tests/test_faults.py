"""Failures under Ray Train: a worker process SIGKILLed mid-run. With ``scaling.max_failures=1``
the worker group restarts from the latest checkpoint, finishes every epoch and keeps one MLflow
run (FINISHED, each epoch once in the history); with ``max_failures=0`` the fit fails with a
message that says what to do, and its MLflow run is FAILED."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

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
    """SIGKILLs one training worker as soon as the run's first checkpoint is on storage."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.killed_at, self.pid, self.stop = run_dir, 0.0, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if any(self.run_dir.glob("checkpoint_*")):
                pids = train_worker_pids()
                if pids:
                    self.pid = pids[-1]
                    os.kill(self.pid, signal.SIGKILL)
                    self.killed_at = time.time()
                    return
            time.sleep(0.05)


def _fit_killed(cfg, run_dir: Path):
    killer = Killer(run_dir)
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
    out, killer = _fit_killed(cfg, tmp_path / "runs" / "kill")
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


def test_killed_worker_without_restarts_fails_clearly_and_marks_the_run_failed(
    ray_session, seg_config, tmp_path: Path
) -> None:
    cfg = seg_config(
        "scaling.workers=2", "scaling.max_failures=0", "train.epochs=4", "data.synthetic_train=384", "run.name=dead"
    )
    out, _ = _fit_killed(cfg, tmp_path / "runs" / "dead")
    assert out.error is not None
    assert (
        "worker process was lost" in out.error
        and "max_failures=0" in out.error
        and f"--resume {tmp_path / 'runs' / 'dead'}" in out.error
    )
    _, run = _one_run(cfg)
    assert run.info.status == "FAILED" and "montage.error" in run.data.tags
