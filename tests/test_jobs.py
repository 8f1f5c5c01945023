"""Job submission to a real local Ray head: `montage submit` with a working dir to upload.

(conftest.py runs these before any test starts the shared in-process Ray session.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from cluster_helpers import BIN, HEAD_ENV, NO_LOG_MONITOR, forget_head, free_port
from stores import mlflow_store

from montage.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head")
    gcs, dash = free_port(), free_port()
    yield from _run_head(tmp, gcs, dash, {**os.environ, **HEAD_ENV}, str(BIN / "ray"))


def _run_head(tmp: Path, gcs: int, dash: int, env: dict, ray_bin: str):  # noqa: C901
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}",  # not Ray's fixed default: the shared session's may hold it
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
            *NO_LOG_MONITOR,
        ],
        cwd=tmp,
        env=env,
        stdout=open(tmp / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    try:
        deadline = time.time() + 120
        while True:  # the job agent comes up a little after the dashboard
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the Ray head did not come up: {(tmp / 'head.log').read_text()[-2000:]}")
                time.sleep(2)
        yield {"address": address, "tmp": tmp}
    finally:  # only this head's processes: never `ray stop`, which would end every Ray here
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        forget_head(gcs)


def _runs(uri: str) -> int:
    mlflow.set_tracking_uri(uri)
    return len(mlflow.search_runs(experiment_names=["montage-segmentation"]))


def test_montage_submit_uploads_the_working_dir_and_runs_a_training(head) -> None:
    """``montage submit train`` with this working dir uploaded (as docs/cluster.md gives it; ``montage submit
    tune`` is test_multinode's, on an autoscaling cluster whose fake nodes share one disk, without an upload):
    the job trains, logs to the given tracking URI and checkpoints."""
    uri = mlflow_store(head["tmp"], "a.db")
    args = [
        "submit", "train", "segmentation", "--config", "segmentation-smoke", "train.epochs=1", "train.max_steps=2",
        "scaling.workers=1", f"run.storage={head['tmp'] / 'runs'}", "run.name=submitted", "--address",
        head["address"], "--tracking-uri", uri, "--python", sys.executable, "--working-dir", str(ROOT),
    ]  # fmt: skip
    for _ in range(20):  # the agent may still refuse the very first job
        rc = main(args)
        if rc == 0 or _runs(uri):
            break
        time.sleep(3)
    assert rc == 0
    assert _runs(uri) == 1  # the training's run
    assert any((head["tmp"] / "runs" / "submitted").glob("checkpoint_*"))
