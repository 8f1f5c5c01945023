"""Segmentation under Ray Train: a 2-worker DDP TorchTrainer (gloo), checkpoint, MLflow, resume."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pytest

from montage.cli.training import _summary
from montage.launch.train import fit_ray
from montage.platform.checkpoint import load_checkpoint


def _staged() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("montage-best-*")}


def test_two_worker_fit_checkpoints_and_logs(ray_session, seg_config, tmp_path: Path) -> None:
    # (its resume under Ray, one MLflow run for both legs: test_distributed's resume-under-Ray test)
    cfg = seg_config("scaling.workers=2", "train.epochs=1", "train.max_steps=2", "run.name=ddp")
    before = _staged()
    out = fit_ray(cfg)
    assert out.error is None
    assert _staged() == before  # rank 0 staged its best checkpoint in the run folder, not in /tmp
    assert not (tmp_path / "runs" / "ddp" / ".montage-best").exists()  # and removed it at the end
    assert out.metrics["epoch"] == 1
    assert 0 < out.metrics["time/startup_s"] < 300  # launch → rank 0's first step
    assert out.metrics["mem/peak_rss_mb"] > 50 and out.metrics["time/train_s"] > 0
    assert [c.metrics["epoch"] for c in out.checkpoints] == [1]
    shown = _summary(out)["checkpoints"][0]  # what `montage train` prints per kept checkpoint
    assert shown["epoch"] == 1 and shown["metrics"]["time/train_s"] > 0 and "train/total" in shown["metrics"]
    state = load_checkpoint(out.checkpoint, task="segmentation")
    assert state["epoch"] == 1 and "net" in state["nets"]
    assert not any(k.startswith("module.") for k in state["nets"]["net"])  # saved unwrapped from DDP

    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["montage-segmentation"])
    assert len(runs) == 1  # only rank 0 logs
    assert runs.iloc[0]["params.scaling.workers"] == "2"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "val/iou")] == [1]


def test_run_resumed_at_its_end_reports_its_final_epoch(ray_session, seg_config, tmp_path: Path) -> None:
    """The cause of a resumed sweep's trial shown as stopped after 1 of 2 epochs: its TorchTrainer had
    checkpointed epoch 2 in the moment between Tune's SIGINT and its death, so the resumed trainer found
    nothing to do and reported nothing; Tune kept epoch 1 as the trial's last result. A run resumed at
    its end must report its final metrics again, to whoever listens (Tune's callback, here a recorder)."""
    import json

    import ray.train

    from montage.launch.train import make_trainer

    reports = tmp_path / "reports.jsonl"

    class Recorder(ray.train.UserCallback):  # runs in the trainer's controller actor: records to a file
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(reports, "a") as fh:
                fh.write(json.dumps({"epoch": metrics[0]["epoch"], "checkpoint": checkpoint is not None}) + "\n")

    def fit(*overrides: str) -> list[dict]:
        reports.unlink(missing_ok=True)
        cfg = seg_config("scaling.cpus_per_worker=0.5", "train.max_steps=1", "tracking.enabled=false", *overrides)
        cfg.run.storage = str(tmp_path / "runs")
        assert make_trainer(cfg, callbacks=[Recorder()]).fit().error is None
        return [json.loads(line) for line in reports.read_text().splitlines()] if reports.exists() else []

    assert fit("train.epochs=2", "run.name=ended") == [{"epoch": 2 - i, "checkpoint": True} for i in (1, 0)]
    assert fit("train.epochs=2", "run.name=ended") == [{"epoch": 2, "checkpoint": False}]  # nothing to train


def test_fresh_run_refuses_to_overwrite(ray_session, seg_config, tmp_path: Path) -> None:
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        fit_ray(seg_config("run.name=taken"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit_ray(seg_config(), resume=str(tmp_path / "runs" / "absent"))


def test_keep_checkpoints_keeps_the_k_best_and_the_latest(ray_session, tiny_config, tmp_path: Path) -> None:
    """``scaling.keep_checkpoints=K``: the K best epochs by the monitored metric stay on storage
    (min mode here: harmonization's fMSE), plus the latest when it is not among them (resuming
    needs it); every other checkpoint is deleted."""
    cfg = tiny_config(
        "harmonization", "scaling.keep_checkpoints=2", "train.epochs=5", "train.max_steps=2", "run.name=prune"
    )
    out = fit_ray(cfg)
    assert out.error is None
    history = {
        int(m.step): m.value
        for m in mlflow.MlflowClient(cfg.tracking.uri).get_metric_history(out.mlflow_run_id, "val/fmse")
    }
    assert sorted(history) == [1, 2, 3, 4, 5]
    best_two = set(sorted(history, key=lambda e: history[e])[:2])
    on_storage = {
        load_checkpoint(p, task="harmonization")["epoch"]
        for p in (tmp_path / "runs" / "prune").glob("checkpoint_*")
        if p.is_dir()
    }
    assert on_storage == best_two | {5}, (history, on_storage)
    assert min(history, key=lambda e: history[e]) in on_storage and out.best_epoch == min(
        history, key=lambda e: history[e]
    )
    assert len(on_storage) <= 3


def test_a_training_that_dies_ungracefully_gives_its_cpus_back(ray_session, tiny_config, tmp_path: Path) -> None:
    """A training whose driver dies mid-run (as a trial Tune stops, or a killed sweep's) leaves its
    placement group to Ray Train's ``PlacementGroupCleaner``, which asks the dashboard's State API
    whether the controller lives: on a Ray without a dashboard it never answers, the group keeps its
    CPUs for the rest of the session, and the next sweep waits for them forever."""
    import ray
    from cluster_helpers import live_placement_groups, wait_placement_groups_removed, wait_until

    cfg = tiny_config("harmonization", "train.epochs=200", "train.max_steps=2", "run.name=dies")
    driver = ray.remote(num_cpus=0)(fit_ray).remote(cfg)  # the training's driver, in a Ray worker process
    wait_until(lambda: any((tmp_path / "runs" / "dies").glob("checkpoint_*")), 180, "the first checkpoint")
    assert live_placement_groups()  # its workers hold their CPUs
    ray.cancel(driver, force=True)  # the driver's process dies; the controller it owns dies with it
    wait_placement_groups_removed(60, "a training whose driver was killed")
