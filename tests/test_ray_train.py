"""Runs under Ray Train: refusals, the trainer montage makes (kept checkpoints). (The 2-worker DDP runs —
checkpoints, MLflow, resume, a resume with nothing left to do — are test_distributed's, which shares three
of them between its tests; a training whose driver dies is test_multinode's, on a cluster of several nodes.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from montage.launch.train import fit_ray


def test_fresh_run_refuses_to_overwrite(ray_session, seg_config, tmp_path: Path) -> None:
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume"):
        fit_ray(seg_config("run.name=taken"))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit_ray(seg_config(), resume=str(tmp_path / "runs" / "absent"))


@pytest.mark.parametrize(
    "task, metric, order", [("segmentation", "val/iou", "max"), ("harmonization", "val/fmse", "min")]
)
def test_the_trainer_keeps_the_k_best_checkpoints_by_the_tasks_metric(tiny_config, task, metric, order) -> None:
    """``scaling.keep_checkpoints=K`` and the task's monitored metric and mode become Ray Train's checkpoint
    config: the K best epochs stay on storage, plus the latest (Ray keeps it for resuming). What stays on
    storage after a real fit is test_multinode's killed-workers test (a killed run on S3, resumed: the 2 best
    by IoU and the last epoch are the bucket's checkpoints, every other one deleted)."""
    from montage.launch.train import make_trainer

    cfg = tiny_config(task, "scaling.keep_checkpoints=3", "scaling.max_failures=2", "run.name=keep")
    run = make_trainer(cfg).run_config
    kept = run.checkpoint_config
    assert (kept.num_to_keep, kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (3, metric, order)
    assert run.failure_config.max_failures == 2 and run.name == "keep"


def test_the_trainer_starts_no_ray_data_actor_without_datasets() -> None:
    """montage passes no ``datasets``: its TorchTrainer leaves out Ray Train's Ray Data callback, whose
    ``DatasetManager`` actor (one more process per fit, ~3 s of CPU) would serve nothing; given datasets,
    the callback is there as in the plain trainer."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from montage.launch.train import _trainer_class

    def callbacks(trainer_class: type, **datasets) -> set[str]:
        run = ray.train.RunConfig(name="unused", storage_path="/nonexistent")
        trainer = trainer_class(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), run_config=run,
                                datasets=datasets or None)  # fmt: skip
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    assert "DatasetsCallback" in callbacks(TorchTrainer)  # what is left out, were Ray to rename it
    assert callbacks(_trainer_class()) == callbacks(TorchTrainer) - {"DatasetsCallback"}
    assert callbacks(_trainer_class(), train=[1]) == callbacks(TorchTrainer, train=[1])
