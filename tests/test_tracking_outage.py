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
def down_server(tmp_path):
    """A server that is down when the test starts (its port refuses; ``start`` brings it up): the same
    as one stopped, without the seconds an MLflow server takes to start."""
    s = MlflowServer(tmp_path / "mlflow")
    yield s
    s.stop()


@pytest.fixture
def server(down_server):
    """A server that answers when the test starts (stopped by ``down_server``'s teardown)."""
    return down_server.start()


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


def test_a_server_down_at_the_start_is_refused_at_once_unless_not_required(down_server, tiny_config, tmp_path) -> None:
    """tracking.required (the default): a clear error before training. required=false: it trains with
    the server down to the end, its records wait in the run folder, and a resume once the server is
    back sends them: one FINISHED run with every epoch once."""
    server = down_server
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
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", resumed
    assert _epochs(server.uri, runs[0].info.run_id) == [1, 2, 3]
    assert not outbox.exists()


def test_the_outbox_of_a_run_on_object_storage_outlives_its_worker(
    down_server, tiny_config, s3_endpoint, tmp_path
) -> None:
    """run.storage on S3 (nodes share no disk): a worker that trains while the server is away keeps its
    outbox in the run folder on the bucket; its own staging folder goes when it ends. A worker elsewhere
    that continues the run (a restart on another node, a resume) finds the records there and sends them
    once the server is back: one FINISHED run with every epoch, grid and the model once; nothing left."""
    import tempfile

    import torch

    from montage.launch.lifecycle import rank_hooks
    from montage.platform.runner import WorkerEnv, build_loop

    bucket = s3_endpoint.bucket("outbox")
    server = down_server
    cfg = tiny_config("segmentation", "train.epochs=2", f"tracking.uri={server.uri}", *QUICK,
                      "tracking.required=false", "tracking.drain_s=0.5", f"run.storage=s3://{bucket}/runs",
                      f"run.storage_endpoint={s3_endpoint.url}", "run.name=away")  # fmt: skip

    def worker(state: dict | None = None):
        """Rank 0 of a Ray Train worker group, as train_loop_per_worker builds it: its own staging folder."""
        with tempfile.TemporaryDirectory(dir=tmp_path) as staging:
            loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), rank_hooks(cfg, 0, staging, False))
            if state is not None:
                loop.load_state_dict(state)
            loop.fit()
        assert not Path(staging).exists()
        return loop

    first = worker()
    queued = s3_endpoint.keys(bucket, "runs/away/tracking-outbox/")
    records = [k for k in queued if k.endswith("records.jsonl")]
    assert len(records) == 1 and len(queued) == 4, queued  # the records, 2 sample grids, the model's weights
    assert sum(k.endswith(".png") for k in queued) == 2 and sum(k.endswith("best.pt") for k in queued) == 1

    server.start()
    worker(first.state_dict())  # continues at its end: sends what waits, adds nothing
    client = mlflow.MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("montage-segmentation").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["montage.run_dir"] == f"s3://{bucket}/runs/away"  # a later resume finds it
    assert _epochs(server.uri, run.info.run_id) == [1, 2]
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {"samples/epoch_001.png", "samples/epoch_002.png"}
    assert len(client.search_logged_models([run.info.experiment_id])) == 1
    left = s3_endpoint.keys(bucket, "runs/away/tracking-outbox/")
    assert [k for k in left if not k.endswith("/")] == []  # all sent (pyarrow may leave a folder marker)


def test_the_outbox_is_bounded_sample_grids_first() -> None:
    """tracking.outbox_limit=10: past 90 % of it a record queues without its sample grid, past the limit
    new records are dropped, each drop counted; the end of the run is always kept (it says how it ended).
    What is queued survives the process (read back by the next one)."""
    import tempfile

    import numpy as np

    from montage.tracking.outbox import Outbox

    grid = np.zeros((8, 8, 3), np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        box = Outbox(Path(folder), limit=10)
        for epoch in range(1, 13):
            box.add({"kind": "epoch", "epoch": epoch, "artifact_file": f"samples/epoch_{epoch:03d}.png"}, grid)
        box.add({"kind": "model"})
        box.add({"kind": "end", "status": "FINISHED"})
        assert [r.get("epoch") for r in box.records] == [*range(1, 11), None]  # epochs 11, 12 and the model dropped
        assert [bool(r.get("image")) for r in box.records[:10]] == [True] * 9 + [False]  # epoch 10: no grid
        assert box.records[-1]["kind"] == "end" and box.dropped == 4  # 3 records, 1 grid
        assert len(list(Path(folder).glob("*.png"))) == 9
        again = Outbox(Path(folder), limit=10)
        assert again.records == box.records


def test_a_full_outbox_says_what_it_dropped(tiny_config, caplog) -> None:
    """The server is away for the whole training (a port nobody listens on): the warning says how many
    records are pending and how many the full outbox dropped, and the training still ends normally."""
    from cluster_helpers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_config("segmentation", "train.epochs=4", f"tracking.uri={uri}", *QUICK, "tracking.required=false",
                      "tracking.outbox_limit=2", "tracking.drain_s=1", "run.name=full")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="montage.tracking.runs"):
        summary = fit_local(cfg)
    assert summary.metrics["epoch"] == 4
    records = (Path(summary.run_dir) / "tracking-outbox" / "records.jsonl").read_text().splitlines()
    assert len(records) == 3  # epochs 1 and 2, and the end; epochs 3, 4 and the model dropped
    dropped = [r.message for r in caplog.records if "dropped: outbox full" in r.message]
    assert dropped and "3 record(s) pending" in dropped[-1] and "(3 dropped: outbox full)" in dropped[-1]
    assert any("still does not answer: 3 record(s) of this run wait in" in r.message for r in caplog.records)


def test_a_sweep_does_not_start_without_its_tracking_server(tmp_path, monkeypatch) -> None:
    """A sweep compares its trials in MLflow: with its server down it is refused at once, before Ray is
    asked for and whatever tracking.required says, naming the server."""
    from cluster_helpers import free_port

    from montage.launch import session
    from montage.launch.tune import load_tune_config, run_sweep

    root = Path(__file__).resolve().parent.parent
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(session, "ensure_ray", lambda *a, **k: pytest.fail("Ray was asked for"))
    for required in ("true", "false"):
        tcfg, base, params = load_tune_config(
            root / "tune_configs" / "segmentation-tiny.yaml",
            [f"storage={tmp_path / 'tune'}", f"base.tracking.uri={uri}", f"base.tracking.required={required}"],
        )
        started = time.time()
        with pytest.raises(TrackingUnavailable, match=rf"{uri} does not answer .*A sweep compares its trials"):
            run_sweep(tcfg, base, params)
        assert time.time() - started < 15
