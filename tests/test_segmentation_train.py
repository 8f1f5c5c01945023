"""Segmentation through the platform in-process: it learns, tracks to MLflow, predicts."""

from __future__ import annotations

from pathlib import Path

import cv2
import mlflow
import numpy as np
import torch

from montage.cli import main
from montage.launch.local import fit_local
from montage.platform.runner import WorkerEnv, build_loop


def test_the_tiny_recipe_learns_thin_limbs_far_past_the_untrained_model(recipe_config) -> None:
    # the demo's recipe on a quarter of its steps: 384 optimizer steps (the full run reaches IoU ≈ 0.92)
    cfg = recipe_config("segmentation", "data.synthetic_train=384", "data.synthetic_val=48", "train.epochs=8")
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])
    untrained = loop.evaluate()
    loop.fit()
    best = loop.best.value
    print(
        f"val/iou untrained {untrained['val/iou']:.3f} → trained {best:.3f}; "
        f"trimap accuracy {untrained['val/trimap_acc']:.3f} → {loop.last_metrics['val/trimap_acc']:.3f}"
    )
    assert best > untrained["val/iou"] + 0.4
    assert best > 0.68
    assert loop.last_metrics["val/trimap_acc"] > untrained["val/trimap_acc"] + 0.15


def test_fit_logs_to_mlflow_and_predict_writes_rgba(seg_config, tmp_path: Path) -> None:
    cfg = seg_config("train.epochs=2", "run.name=tracked")
    out = fit_local(cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["montage-segmentation"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["run_id"] == out.mlflow_run_id
    assert run["params.loss.dice"] == "1.0" and run["params.model.encoder"] == "tiny"
    assert 0 <= run["metrics.val/iou"] <= 1 and "metrics.train/bce" in runs.columns
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run["run_id"], "val/iou")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"], "samples")}
    assert artifacts == {"samples/epoch_001.png", "samples/epoch_002.png"}
    assert run["tags.montage.task"] == "segmentation"
    models = mlflow.search_logged_models(experiment_ids=[run["experiment_id"]], output_format="list")
    assert models and models[0].source_run_id == run["run_id"]
    # the logged model loads back and predicts an alpha of the input's size
    model = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
    image = np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)
    alpha = model.predict([image])[0]
    assert alpha.shape == (45, 70) and 0 <= alpha.min() and alpha.max() <= 1

    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "p.jpg"), image)
    rc = main(
        [
            "predict",
            "segmentation",
            "--checkpoint",
            out.best_checkpoint,
            "--input",
            str(inputs),
            "--output",
            str(tmp_path / "pred"),
            "--tta",
        ]
    )
    assert rc == 0
    rgba = cv2.imread(str(tmp_path / "pred" / "p.png"), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (45, 70, 4)


def test_cli_errors_are_clear(tmp_path: Path, capsys, caplog) -> None:
    assert main(["train", "nosuchtask"]) == 2
    assert "unknown task 'nosuchtask'" in caplog.text
    assert main(["train", "segmentation", "--no-ray", "train.epoch=1"]) == 2
    assert "unknown config key 'train.epoch'" in caplog.text
    assert (
        main(["predict", "segmentation", "--checkpoint", str(tmp_path / "none.pt"), "--input", "x", "--output", "y"])
        == 2
    )
    assert "checkpoint not found" in caplog.text


def test_in_process_training_takes_the_global_batch_of_the_configs_workers(seg_config, tmp_path: Path) -> None:
    """``train.batch_size`` is per worker: a config of 2 workers × 4 trains 8 images a step. In this process
    (``montage train --no-ray``, the toolbox, the demo) the one rank takes that global batch: the steps of
    an epoch are the Ray run's (32 images: 4, not 8), and the run records what it trained."""
    import yaml

    from montage.platform.loop import Hook

    class Steps(Hook):
        count = 0

        def after_optimizer_step(self, loop, name) -> None:
            Steps.count += 1

    two = ["scaling.workers=2", "train.batch_size=4", "data.synthetic_train=32", "train.epochs=1",
           "tracking.enabled=false"]  # fmt: skip
    fit_local(seg_config(*two, "run.name=direct"), extra_hooks=[Steps()])
    assert Steps.count == 4
    assert main(["train", "segmentation", "--config", "segmentation-smoke", "--no-ray", "--workers", "2", *two,
                 f"run.storage={tmp_path / 'runs'}", "run.name=cli"]) == 0  # fmt: skip
    for name in ("direct", "cli"):
        saved = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
        assert (saved["train"]["batch_size"], saved["scaling"]["workers"]) == (8, 1)
