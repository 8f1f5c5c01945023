"""The tracking server goes away: training goes on, queues what it cannot send in the run folder,
and sends it when the server is back (a real ``mlflow server`` over HTTP, stopped and started)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import mlflow
import pytest
from cluster_helpers import MlflowServer

from montage.launch.local import fit_local
from montage.platform.loop import Hook
from montage.tracking.runs import TrackingUnavailable

QUICK = ["tracking.retries=0", "tracking.retry_s=0.5", "tracking.retry_max_s=2",
         "train.max_steps=2", "tracking.artifacts="]  # fmt: skip


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "mlflow").start()
    yield s
    s.stop()


class Outage(Hook):
    """Stops the server after epoch ``down``; starts it again (in the background) after epoch ``up``."""

    def __init__(self, server: MlflowServer, down: int, up: int) -> None:
        self.server, self.down, self.up, self.back = server, down, up, None

    def after_epoch(self, loop, metrics) -> None:
        if loop.epoch == self.down:
            self.server.stop()
        if loop.epoch == self.up:
            self.back = threading.Thread(target=self.server.start)
            self.back.start()


def _epochs(uri: str, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "epoch"))


def test_training_goes_on_while_the_tracking_server_is_away(server, tiny_config, caplog) -> None:
    """Server stopped after epoch 1, back after epoch 4 of 6: the training never waits on it, the
    queued epochs are sent when it answers, and the run ends FINISHED with every epoch once and its
    sample grids and model."""
    cfg = tiny_config("segmentation", "train.epochs=6", f"tracking.uri={server.uri}", *QUICK)
    outage = Outage(server, down=1, up=4)
    with caplog.at_level(logging.WARNING, logger="montage.tracking.runs"):
        summary = fit_local(cfg, extra_hooks=[outage])
    outage.back.join()
    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert _epochs(server.uri, run.info.run_id) == [1, 2, 3, 4, 5, 6]
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {f"samples/epoch_{e:03d}.png" for e in range(1, 7)} <= samples
    assert run.outputs.model_outputs or client.search_logged_models([run.info.experiment_id])  # the model, sent late
    assert any("does not answer" in r.message and "pending" in r.message for r in caplog.records)
    assert any("answers again" in r.message for r in caplog.records)
    assert not (Path(summary.run_dir) / "tracking-outbox" / "records.jsonl").exists()  # all sent


def test_a_server_down_at_the_start_is_refused_at_once_unless_not_required(server, tiny_config, tmp_path) -> None:
    """tracking.required (the default): a clear error before training. required=false: it trains with
    the server down to the end, its records wait in the run folder, and a resume once the server is
    back sends them: one FINISHED run with every epoch once."""
    server.stop()
    cfg = tiny_config("segmentation", "train.epochs=3", f"tracking.uri={server.uri}", *QUICK)
    started = time.time()
    with pytest.raises(TrackingUnavailable, match=r"does not answer.*tracking.required=false"):
        fit_local(cfg)
    assert time.time() - started < 15

    cfg = tiny_config("segmentation", "train.epochs=3", f"tracking.uri={server.uri}", *QUICK, "tracking.required=false",
                      "tracking.drain_s=1", "run.name=offline")  # fmt: skip
    summary = fit_local(cfg)
    assert summary.metrics["epoch"] == 3 and summary.mlflow_run_id is None
    outbox = tmp_path / "runs" / "offline" / "tracking-outbox" / "records.jsonl"
    assert len(outbox.read_text().splitlines()) == 5  # 3 epochs, the model, the end

    server.start()
    cfg = tiny_config("segmentation", "train.epochs=3", f"tracking.uri={server.uri}", *QUICK)
    resumed = fit_local(cfg, resume=tmp_path / "runs" / "offline")
    client = mlflow.MlflowClient(server.uri)
    exp = client.get_experiment_by_name("montage-segmentation")
    runs = client.search_runs([exp.experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED" and _epochs(server.uri, r.info.run_id)]
    assert len(finished) == 1 and _epochs(server.uri, finished[0].info.run_id) == [1, 2, 3], resumed
    assert not outbox.exists()
