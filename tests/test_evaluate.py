"""`montage evaluate`: the training run's validation numbers, the task's baselines on the same images,
the report folder, the MLflow evaluation run linked to the version; the data fingerprint of a run."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from montage.cli import main
from montage.core.registry import TASKS


def test_trained_run_logs_its_data_and_evaluate_reproduces_its_validation(seg_config, tmp_path: Path, caplog) -> None:
    import mlflow

    from montage.core import schema
    from montage.launch.local import fit_local
    from montage.platform.fingerprint import fingerprint
    from montage.tracking.runs import log_checkpoint_model

    # no perceptual term: a random VGG16 costs seconds per task instance; registered once, below
    cfg = seg_config("train.epochs=1", "tracking.log_model=false", "loss.perceptual=0")
    uri = cfg.tracking.uri
    summary = fit_local(cfg)
    client = mlflow.MlflowClient(tracking_uri=uri)
    inputs = client.get_run(summary.mlflow_run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.digest == fingerprint(cfg.data).short and ds.name == "segmentation-synthetic"
    assert json.loads(ds.profile)["splits"] == {"train": 32, "val": 8}
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    # another seed is other data: another digest
    assert fingerprint(seg_config("data.seed=3").data).short != ds.digest

    ckpt = Path(summary.best_checkpoint)
    info = log_checkpoint_model(uri, summary.mlflow_run_id, ckpt, "segmentation", {}, "montage-segmentation")
    version = client.get_model_version("montage-segmentation", info.registered_model_version)
    assert version.tags[schema.DATA_DIGEST] == ds.digest

    out = tmp_path / "report"
    source = f"models:/montage-segmentation/{info.registered_model_version}"
    argv = ["evaluate", "segmentation", "--source", source, "--out", str(out), "--tracking-uri", uri, "--worst", "3"]
    assert main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    # the training run's validation of that checkpoint (its one epoch), to the last bit
    reference = {k: v for k, v in summary.metrics.items() if k.startswith("val/")}
    assert len(reference) > 5 and {k: report["metrics"][k] for k in reference} == reference
    base = report["baselines"]
    assert base["background"]["val/iou"] == 0.0
    assert 0.2 < base["grabcut"]["val/iou"] <= 1.0 and "val/loss" not in base["grabcut"]
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 8 and sum(float(r["iou"]) for r in rows) / 8 == pytest.approx(reference["val/iou"], rel=1e-5)
    worst = sorted(float(r["iou"]) for r in rows)[:3]
    assert [float(rows[i]["iou"]) for i in report["worst"]] == worst
    assert (out / "worst.png").is_file() and "grabcut" in (out / "comparison.md").read_text()

    exp = client.get_experiment_by_name("montage-segmentation").experiment_id
    runs = client.search_runs([exp], filter_string="tags.`montage.kind` = 'evaluation'")
    assert len(runs) == 1 and runs[0].data.metrics["baseline/grabcut/iou"] == base["grabcut"]["val/iou"]
    rid = runs[0].info.run_id
    assert client.get_model_version("montage-segmentation", version.version).tags["montage.evaluation_run"] == rid
    assert client.get_run(rid).inputs.dataset_inputs[0].dataset.digest == ds.digest

    # a held-out data config; a model of another task
    assert main(["evaluate", "segmentation", "--source", str(ckpt), "--out", str(tmp_path / "r2"), "--no-track",
                 "--data", "synthetic_val=4", "seed=7"]) == 0  # fmt: skip
    held_out = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert held_out["metrics"]["val/samples"] == 4 and held_out["metrics"]["val/iou"] != report["metrics"]["val/iou"]
    caplog.set_level(logging.ERROR, logger="montage")
    assert main(["evaluate", "harmonization", "--source", str(ckpt), "--no-track"]) == 2
    assert "is a 'segmentation' checkpoint, not 'harmonization'" in caplog.text
    assert main(["evaluate", "segmentation", "--source", str(tmp_path / "nope.pt"), "--no-track"]) == 2
    assert "nope.pt" in caplog.text


def _val_batch(task, n: int) -> dict[str, torch.Tensor]:
    _, val = task.datasets()
    return default_collate([val[i] for i in range(min(n, len(val)))])


def test_harmonization_baselines_composite_and_colour_transfer(tiny_config) -> None:
    from montage.platform.task import Modules

    task = TASKS.get("harmonization")(
        tiny_config("harmonization", "data.synthetic_val=16", "data.size=64", "loss.perceptual=0", "loss.style=0")
    )
    batch = _val_batch(task, 16)
    base = task.baselines(batch)
    with torch.no_grad():
        model = task.eval_step(Modules(task.build_nets()), batch)
    for k in ("mse", "fmse", "psnr", "ssim"):  # the composite baseline is eval_step's own baseline_*
        assert torch.equal(base["composite"][k], model[f"baseline_{k}"])
    for space in ("lab", "rgb"):
        ratio = float(base[f"transfer_{space}"]["fmse"].mean() / base["composite"]["fmse"].mean())
        print(f"colour transfer ({space}) fMSE / composite fMSE = {ratio:.3f}")
        assert ratio < 0.5


def test_pix2pix_mean_face_baseline_is_eval_steps(tiny_config) -> None:
    from montage.platform.task import Modules

    task = TASKS.get("pix2pix")(tiny_config("pix2pix"))
    batch = _val_batch(task, 4)
    with torch.no_grad():
        model = task.eval_step(Modules(task.build_nets()), batch)
    base = task.baselines(batch)["mean_face"]
    assert torch.allclose(base["l1"], model["baseline_l1"]) and set(base) <= set(model)


@pytest.mark.parametrize(
    ("task", "overrides", "baselines"),
    [
        ("harmonization", ["loss.perceptual=0", "loss.style=0"], {"composite", "transfer_lab", "transfer_rgb"}),
        ("pix2pix", [], {"mean_face", "warped_mean_face"}),
    ],
)
def test_evaluate_reproduces_the_validation_of_harmonization_and_pix2pix(
    tiny_config, tmp_path: Path, task: str, overrides: list[str], baselines: set[str]
) -> None:
    from montage.launch.local import fit_local

    summary = fit_local(tiny_config(task, "train.epochs=1", "tracking.enabled=false", *overrides))
    out = tmp_path / "report"
    argv = ["evaluate", task, "--source", summary.best_checkpoint, "--out", str(out), "--no-track", "--worst", "2"]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"metrics.json", "comparison.md", "per_image.csv", "worst.png"}
    report = json.loads((out / "metrics.json").read_text())
    reference = {k: v for k, v in summary.metrics.items() if k.startswith("val/")}
    assert len(reference) > 3 and {k: report["metrics"][k] for k in reference} == reference  # to the last bit
    assert set(report["baselines"]) == baselines and all(report["baselines"][b] for b in baselines)
    table = (out / "comparison.md").read_text()
    assert all(f" {b} " in table.splitlines()[0] for b in baselines)
    assert len(list(csv.DictReader((out / "per_image.csv").open()))) == 8 and len(report["worst"]) == 2

    # the same model exported to ONNX (the file names its checkpoint): ONNX Runtime's numbers, the same baselines
    from montage.tracking.variants import export_model

    onnx = export_model(task, summary.best_checkpoint, tmp_path / f"{task}.onnx", dynamic_batch=True, register=False)
    argv = ["evaluate", task, "--source", str(onnx.report.path), "--out", str(tmp_path / "onnx"), "--no-track"]
    assert main(argv) == 0
    exported = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    assert exported["baselines"] == report["baselines"]
    for k, v in reference.items():
        assert exported["metrics"][k] == pytest.approx(v, rel=1e-3, abs=1e-5), k
