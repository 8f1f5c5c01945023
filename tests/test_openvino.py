"""The OpenVINO variant (``montage optimize <task> --method openvino``): a registered version's IR is
registered as a new version tagged with what it is and how it measured against its parent, it
resolves to the OpenVINO runtime (registry version or .xml file), a predictor on it answers like
PyTorch, INT8 runs the quantized model, a variant past the tolerance is refused and nothing is
written or registered, and bad requests get one clear line. Serve end to end: tests/test_serve.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from montage.launch.local import fit_local
from montage.platform.export import ExportError
from montage.tracking import registry as reg
from montage.tracking.ov_variant import openvino_model
from montage.tracking.sources import resolve_source

VARIANT_TAGS = (
    "montage.variant",
    "montage.runtime",
    "montage.parent",
    "montage.params",
    "montage.size_mb",
    "montage.max_abs_diff",
    "montage.openvino_version",
    "montage.latency_ms",
    "montage.parent_latency_ms",
    "montage.speedup",
    "montage.quality_metric",
    "montage.quality_delta",
)


def test_a_registered_version_becomes_a_tagged_openvino_variant_and_int8_quantizes(tiny_config, tmp_path: Path) -> None:
    from montage.platform.inference import load_predictor
    from montage.platform.ov_runtime import load_openvino_predictor

    cfg = tiny_config("segmentation", "train.max_steps=2", "run.name=ov", "tracking.log_model=false")
    fit = fit_local(cfg)
    uri = cfg.tracking.uri
    reg.register_checkpoint(cfg, fit.best_checkpoint, fit.mlflow_run_id, "val/iou", "max", 0.5, "manual", {}, "better")
    made = openvino_model(
        "segmentation", "models:/montage-segmentation@champion", tmp_path / "seg.xml", samples=3, tracking_uri=uri
    )
    assert (made.name, made.version, made.parent) == ("montage-segmentation", "2", "models:/montage-segmentation/1")
    assert made.report.max_abs_diff <= 1e-3 and made.report.checked_shapes[1][0] == 3  # the 3 samples batched too
    mv = reg.client(uri).get_model_version("montage-segmentation", "2")
    assert all(k in mv.tags for k in VARIANT_TAGS), sorted(set(VARIANT_TAGS) - set(mv.tags))
    assert (mv.tags["montage.variant"], mv.tags["montage.runtime"]) == ("openvino", "openvino")
    assert mv.tags["montage.parent"] == "models:/montage-segmentation/1"
    assert float(mv.tags["montage.size_mb"]) == pytest.approx(made.report.size_mb, abs=1e-3)
    # measured against the parent on its validation data: the same network in fp32, so the same quality
    assert mv.tags["montage.quality_metric"] == "val/iou" and abs(float(mv.tags["montage.quality_delta"])) < 1e-4
    m = made.measurement
    assert float(mv.tags["montage.latency_ms"]) == pytest.approx(m.latency_ms, abs=0.01) and m.latency_ms > 0
    assert float(mv.tags["montage.parent_latency_ms"]) == pytest.approx(m.parent_latency_ms, abs=0.01)
    assert float(mv.tags["montage.speedup"]) == pytest.approx(m.parent_latency_ms / m.latency_ms, abs=0.01)
    assert str(reg.champion("segmentation", uri).version) == "1"  # promoting stays the user's choice

    # the version resolves to its IR (.xml + .bin) and the parent's checkpoint, run by OpenVINO
    resolved = resolve_source("models:/montage-segmentation/2", uri)
    assert resolved.runtime == "openvino" and resolved.ir.suffix == ".xml" and resolved.ir.with_suffix(".bin").is_file()
    parent_ckpt = resolve_source("models:/montage-segmentation/1", uri).checkpoint
    assert resolved.checkpoint == parent_ckpt
    # the file written beside the command names its parent in its rt_info: a model source of its own
    assert resolve_source(str(tmp_path / "seg.xml"), uri).checkpoint == parent_ckpt
    # the predictor Serve's runtime: openvino builds answers like PyTorch at another image size
    image = np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)
    ours = load_openvino_predictor(resolved.ir, resolved.checkpoint, task="segmentation")([image])[0]
    ref = load_predictor(parent_ckpt, task="segmentation", device="cpu")([image])[0]
    assert ours.shape == ref.shape == (45, 70) and np.abs(np.asarray(ours) - np.asarray(ref)).max() <= 1e-4

    # an OpenVINO version has no weights to make a variant from
    with pytest.raises(ValueError, match="is an OpenVINO model already"):
        openvino_model("segmentation", "models:/montage-segmentation/2", tmp_path / "x.xml", tracking_uri=uri)
    # past the tolerance: refused, nothing written, nothing registered (INT8 is ~1e-4 off the fp32 network)
    with pytest.raises(ExportError, match=r"differs from PyTorch by up to .* \(> 1e-06\)"):
        openvino_model(
            "segmentation",
            "models:/montage-segmentation/1",
            tmp_path / "refused.xml",
            precision="int8",
            samples=2,
            tolerance=1e-6,
            tracking_uri=uri,
        )
    assert not list(tmp_path.glob("refused.*"))
    assert [str(v.version) for v in reg.list_versions("segmentation", uri)] == ["1", "2"]

    # INT8 runs the quantized model, from the checkpoint file: not registered unless asked
    int8 = openvino_model("segmentation", fit.best_checkpoint, tmp_path / "int8.xml", precision="int8", samples=4)
    assert not int8.version and [str(v.version) for v in reg.list_versions("segmentation", uri)] == ["1", "2"]
    weights = {v: Path(m.report.path).with_suffix(".bin").stat().st_size for v, m in (("fp32", made), ("int8", int8))}
    assert weights["int8"] < 0.5 * weights["fp32"], weights  # 8-bit weights in the IR
    assert made.report.max_abs_diff < 1e-4 < int8.report.max_abs_diff < 0.5  # quantized, and still near
    assert abs(int8.measurement.delta) < 0.05 and int8.measurement.latency_ms > 0
    resolved = resolve_source(int8.report.path)  # names its checkpoint (a local one by its absolute path)
    assert resolved.runtime == "openvino" and resolved.checkpoint == Path(fit.best_checkpoint).resolve()


def test_bad_openvino_requests_get_one_clear_line(tiny_config, tmp_path: Path, caplog) -> None:
    from montage.cli import main

    harm = fit_local(
        tiny_config("harmonization", "tracking.enabled=false", "train.max_steps=1", "run.name=h")
    ).best_checkpoint
    caplog.set_level(logging.ERROR, logger="montage")
    out = str(tmp_path / "seg.xml")
    assert main(["optimize", "segmentation", "--method", "openvino", "--source", harm, "--output", out]) == 2
    assert f"{harm} is a 'harmonization' checkpoint, not 'segmentation'" in caplog.text
    assert not Path(out).exists()
    caplog.clear()
    assert main(["openvino", "harmonization", "--source", harm, "--samples", "0", "--output", out]) == 2
    assert "--samples must be >= 1" in caplog.text
    caplog.clear()
    args = ["optimize", "harmonization", "--method", "openvino", "--source", harm, "--precision", "fp16"]
    assert main(args) == 2 and "unknown 'fp16' for OpenVINO; valid: fp32, int8" in caplog.text


def test_the_int8_bound_widens_on_cpus_without_vnni(tmp_path: Path) -> None:
    from montage.tracking.ov_variant import INT8_FACTOR, cpu_has_vnni

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert not cpu_has_vnni(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(str(info))
    assert not cpu_has_vnni(str(tmp_path / "missing"))  # cannot tell: the wider bound
    assert INT8_FACTOR["other"] > INT8_FACTOR["vnni"]
