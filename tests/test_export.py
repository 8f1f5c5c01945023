"""ONNX export: every task's inference network round-trips (ONNX Runtime vs PyTorch, at the
validation inputs and at another batch and spatial size), a registered version is exported
and registered as a tagged variant, and bad sources get clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _tiny

from montage.launch.local import fit_local
from montage.platform.checkpoint import CheckpointError
from montage.platform.export import run_session, session
from montage.tracking import registry as reg
from montage.tracking.variants import export_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(task)``: a one-step checkpoint of ``task`` with its near-zero weights perturbed, and its
    dynamic-batch export, made once for the tests below that need them (an export is seconds of torch.export;
    conftest keeps this module on one pytest-xdist worker)."""
    made: dict = {}

    def get(task: str):
        if task not in made:
            tmp = tmp_path_factory.mktemp(f"export-{task}")
            fit = fit_local(_tiny(task, tmp, ["tracking.enabled=false", "train.max_steps=1", f"run.name={task}"]))
            ckpt = _perturbed(fit.best_checkpoint, tmp)
            made[task] = ckpt, export_model(task, ckpt, tmp / f"{task}.onnx", dynamic_batch=True)
        return made[task]

    return get


@pytest.mark.parametrize("task", ["segmentation", "harmonization", "pix2pix"])
def test_export_round_trips_at_any_batch_and_size(exported, task: str) -> None:
    _, variant = exported(task)
    report = variant.report
    assert not variant.version  # a checkpoint file is not registered unless asked
    assert report.max_abs_diff < 1e-4
    first, other = report.checked_shapes
    assert other[0] == first[0] + 1 and other[2:] != first[2:]  # another batch and another size were checked
    assert report.size_mb > 0 and report.params > 1000

    # the file alone, in ONNX Runtime, at a third shape: the outputs have the inputs' size
    sess = session(report.path)
    inputs = {
        i.name: torch.rand(3, 1 if i.name in ("mask", "heatmap") else 3, first[2] * 2, first[3])
        for i in sess.get_inputs()
    }
    (out,) = run_session(sess, inputs)[:1]
    assert out.shape[0] == 3 and out.shape[2:] == (first[2] * 2, first[3]) and np.isfinite(out).all()
    assert float(np.abs(out).max()) > 1e-2  # a graph of zeros would not pass


def _perturbed(checkpoint: str, folder: Path) -> str:
    """The checkpoint with noise on its (near-)zero-initialised weights. A one-step model is near its
    initialisation: harmonization's head starts at zero, so its transform was ~1e-5 and an exported
    graph that outputs zeros was within the 1e-4 tolerance; with the head perturbed it is not."""
    from montage.platform.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    g = torch.Generator().manual_seed(0)
    for weights in state["nets"].values():
        for name, value in weights.items():
            if value.is_floating_point() and "running" not in name and float(value.abs().max()) < 1e-3:
                value.add_(0.05 * torch.randn(value.shape, generator=g))
    state.pop("format", None)
    folder.mkdir(parents=True, exist_ok=True)
    return str(save_checkpoint(state, folder / "perturbed.pt"))


def test_export_of_a_registered_version_becomes_a_tagged_variant(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config("segmentation", "train.max_steps=1", "run.name=reg", "tracking.log_model=false")
    fit = fit_local(cfg)
    reg.register_checkpoint(cfg, fit.best_checkpoint, fit.mlflow_run_id, "val/iou", "max", 0.5, "manual", {}, "better")
    variant = export_model(
        "segmentation", "models:/montage-segmentation@champion", tmp_path / "seg.onnx", tracking_uri=cfg.tracking.uri
    )
    assert (variant.name, variant.version, variant.parent) == (
        "montage-segmentation",
        "2",
        "models:/montage-segmentation/1",
    )
    mv = reg.client(cfg.tracking.uri).get_model_version("montage-segmentation", "2")
    assert mv.tags["montage.variant"] == "onnx" and mv.tags["montage.runtime"] == "onnxruntime"
    assert mv.tags["montage.parent"] == "models:/montage-segmentation/1" and float(mv.tags["montage.size_mb"]) > 0
    # measured against the parent on its validation data: the same network, so the same quality
    assert mv.tags["montage.quality_metric"] == "val/iou" and abs(float(mv.tags["montage.quality_delta"])) < 1e-4
    assert float(mv.tags["montage.latency_ms"]) > 0 and float(mv.tags["montage.parent_latency_ms"]) > 0
    assert str(reg.champion("segmentation", cfg.tracking.uri).version) == "1"  # promoting stays the user's choice


def test_bad_sources_get_clear_errors(exported, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        export_model("segmentation", str(tmp_path / "missing.pt"), tmp_path / "x.onnx")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        export_model("segmentation", str(junk), tmp_path / "x.onnx")
    ckpt, _ = exported("pix2pix")
    with pytest.raises(CheckpointError, match="pix2pix"):
        export_model("segmentation", ckpt, tmp_path / "x.onnx")  # a checkpoint of another task


def test_onnx_predictors_answer_like_the_torch_ones(exported) -> None:
    """The task predictors with their exported network in ONNX Runtime (what Serve's ``runtime: onnx``
    runs): same outputs as PyTorch at an arbitrary image size. The weights are perturbed and the answers
    checked to be far from what a graph of zeros gives (a 0.5 alpha; the composite unchanged), so a
    broken export cannot pass. The .onnx file alone is a model source: it names its checkpoint. The files are
    the module's dynamic-batch exports (a fixed-batch one, ``montage export``'s default, is the
    registered-variant test's): an export is seconds of torch.export."""
    from montage.platform.inference import load_onnx_predictor, load_predictor
    from montage.tracking.sources import resolve_source

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)
    mask = np.zeros((45, 70), np.uint8)
    mask[10:35, 20:50] = 255
    for task, args in (("segmentation", ([image],)), ("harmonization", ([image], [mask]))):
        ckpt, variant = exported(task)
        onnx_path = variant.report.path
        ours = np.asarray(load_onnx_predictor(onnx_path, ckpt, task=task)(*args)[0], np.float64)
        ref = np.asarray(load_predictor(ckpt, task=task, device="cpu")(*args)[0], np.float64)
        tolerance = 1e-4 if task == "segmentation" else 1  # alpha in [0, 1]; uint8 levels
        zeros = np.full(ref.shape, 0.5) if task == "segmentation" else image.astype(np.float64)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= tolerance < np.abs(ref - zeros).max() / 10, task
        assert resolve_source(onnx_path).checkpoint == Path(ckpt).resolve()


def test_int8_calibrates_stays_near_fp32_and_registers(exported, tiny_config, tmp_path: Path) -> None:
    from montage.tracking.variants import quantize_model

    cfg = tiny_config("segmentation", "train.max_steps=2", "run.name=q", "tracking.log_model=false")
    fit = fit_local(cfg)
    reg.register_checkpoint(cfg, fit.best_checkpoint, fit.mlflow_run_id, "val/iou", "max", 0.5, "manual", {}, "better")
    variant = quantize_model(
        "segmentation",
        "models:/montage-segmentation@champion",
        tmp_path / "seg-int8.onnx",
        samples=8,
        tracking_uri=cfg.tracking.uri,
    )
    _, fp32 = exported("segmentation")  # a float32 export of the same architecture
    report = variant.report
    assert report.size_mb < fp32.report.size_mb  # 8-bit weights
    # logits of the INT8 model within a bound of the fp32 PyTorch network on the calibration samples
    assert 0 < report.max_abs_diff < 0.5, report.max_abs_diff
    mv = reg.client(cfg.tracking.uri).get_model_version("montage-segmentation", variant.version)
    assert mv.tags["montage.variant"] == "int8" and mv.tags["montage.parent"] == "models:/montage-segmentation/1"
    with pytest.raises(ValueError, match="calibration set"):
        quantize_model("segmentation", fit.best_checkpoint, tmp_path / "x.onnx", samples=0)
    with pytest.raises(ValueError, match="int8, fp16"):
        quantize_model("segmentation", fit.best_checkpoint, tmp_path / "x.onnx", precision="int4")


def test_fp16_variant_runs_and_stays_near_fp32(exported, tmp_path: Path) -> None:
    """fp16 (for GPU providers) runs in ONNX Runtime here too, float32 in and out, its weights half the size."""
    from montage.tracking.variants import quantize_model

    ckpt, fp32 = exported("harmonization")  # perturbed: the transform is far from a graph of zeros
    half = quantize_model("harmonization", ckpt, tmp_path / "h16.onnx", samples=2, precision="fp16")
    saved_mb = fp32.report.size_mb - half.report.size_mb  # 2 bytes a weight, beside the graph's own structure
    assert saved_mb > 0.8 * fp32.report.params * 2 / 2**20 and 0 <= half.report.max_abs_diff < 0.05
    sess = session(half.report.path)
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)", "tensor(float)"]
    composite = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    names = [i.name for i in sess.get_inputs()]  # composite, mask
    inputs = dict(zip(names, (composite, (composite[:, :1] > 0.5).float())))
    (ours,), (ref,) = run_session(sess, inputs)[:1], run_session(session(fp32.report.path), inputs)[:1]
    # near fp32 (10 % of the transform's size), and the transform is not a zero one
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max() and np.abs(ref).max() > 0.05


def test_a_dynamic_batch_export_from_one_sample_takes_any_batch(tmp_path: Path) -> None:
    """INT8 and OpenVINO variants export from one validation sample: harmonization's global colour head
    (the tiny recipe's) exported from a batch of one took a batch of one only, and ONNX Runtime refused
    the check at a batch of two."""
    from montage.platform.export import ExportSpec, export_onnx
    from montage.tasks.harmonization.model import HarmModelConfig, HarmonizationUNet
    from montage.tasks.harmonization.task import TransformOnly

    torch.manual_seed(0)
    net = HarmonizationUNet(HarmModelConfig(widths=[8, 16, 32], head="global")).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the zero-initialised heads: outputs that can differ
    one = {"composite": torch.rand(1, 3, 64, 64), "mask": (torch.rand(1, 1, 64, 64) > 0.5).float()}
    report = export_onnx(ExportSpec(TransformOnly(net), one, ["transform"], multiple=4), tmp_path / "g.onnx",
                         dynamic_batch=True)  # fmt: skip
    assert report.max_abs_diff < 1e-4
    three = {"composite": torch.rand(3, 3, 64, 64), "mask": (torch.rand(3, 1, 64, 64) > 0.5).float()}
    (out,) = run_session(session(report.path), three)[:1]
    with torch.no_grad():
        ref = TransformOnly(net)(*three.values())
    assert out.shape == tuple(ref.shape) and float(np.abs(out - ref.numpy()).max()) < 1e-4
    assert float(np.abs(out).max()) > 1e-2
