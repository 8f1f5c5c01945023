"""The OpenVINO variant of a model (``montage optimize <task> --method openvino``): the ONNX export
(fp32, or ONNX Runtime's INT8 QDQ model calibrated on validation samples) converted to OpenVINO IR
with OpenVINO's own API, checked against PyTorch on validation samples, measured against its parent
like every variant, and registered as a new version of ``montage-<task>`` whose artifact is the IR
(``.xml`` + ``.bin``) and whose tag ``montage.runtime=openvino`` makes Serve run it in OpenVINO."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from montage.core import schema
from montage.core.sources import ModelSource
from montage.tracking.registry import model_name
from montage.tracking.variants import (
    Variant,
    measure,
    register_variant,
    registers,
    validation_specs,
    variant_parent,
    variant_tags,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
FP32_TOLERANCE = 1e-3  # as the ONNX export's check
# x86 CPUs without VNNI multiply u8 x s8 pairs into saturating 16-bit sums (OpenVINO's docs: "saturation
# issue"), so OpenVINO's int8 kernels there stray further from PyTorch than ONNX Runtime's on the same QDQ
# model: 5.3x ONNX Runtime's error measured on an AMD EPYC with AVX2 only (within 2x on the Intel Xeons the
# tests ran on before)
INT8_FACTOR = {"vnni": 2.0, "other": 8.0}


def variant_name(precision: str) -> str:
    """``openvino`` (fp32) or ``openvino-int8``."""
    return "openvino" if precision == "fp32" else f"openvino-{precision}"


def openvino_model(
    task: str,
    source: ModelSource | str,
    output: str | Path,
    precision: str = "fp32",
    samples: int = 8,
    tolerance: float | None = None,
    tracking_uri: str = "",
    register: bool | None = None,
) -> Variant:
    """Export ``source``'s inference network to ONNX (dynamic batch and size), for ``precision`` int8
    quantize it (static QDQ, calibrated on ``samples`` validation samples, as ``--method quantize``),
    convert it to OpenVINO IR at ``output`` (``.xml`` + ``.bin``; the parent in its ``rt_info``),
    check it against the fp32 PyTorch network on those samples one by one and batched, measure it
    against the parent and register it (default: when the source is a registered model) as variant
    ``openvino`` / ``openvino-int8``.

    ``tolerance``: the largest |OpenVINO − PyTorch| accepted (raises :class:`ExportError` past it,
    writing nothing); default 1e-3 for fp32, and for int8 twice ONNX Runtime's own error on the same
    QDQ model and samples (+1e-3) on a CPU with VNNI, 8× on one without (``INT8_FACTOR``): OpenVINO must
    run the quantized model about as ONNX Runtime does."""
    import openvino as ov

    from montage.platform.export import ExportError, ExportReport, export_onnx, quantize_int8
    from montage.platform.inference import load_for_inference
    from montage.platform.ov_runtime import compile_ir, convert_ir, ir_size_mb, max_abs_diff

    if precision not in PRECISIONS:
        raise ValueError(f"--precision: unknown '{precision}' for OpenVINO; valid: {', '.join(PRECISIONS)}")
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"--tolerance must be >= 0, got {tolerance}")
    source = ModelSource.parse(source, "--source")
    parent, checkpoint = variant_parent(source, tracking_uri)
    inst, nets = load_for_inference(checkpoint, task=task, device="cpu")
    specs = validation_specs(inst, nets, samples)
    module = specs[0].module.eval()
    batches = [s.inputs for s in specs]
    if len(specs) > 1:  # the samples as one batch: Serve's batches run through the dynamic batch dimension
        import torch

        batches.append({k: torch.cat([s.inputs[k] for s in specs]) for k in specs[0].inputs})
    output = Path(output).with_suffix(".xml")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(specs[0], Path(tmp) / "fp32.onnx", dynamic_batch=True)
        onnx_path = Path(fp32.path)
        if precision == "int8":
            onnx_path = quantize_int8(onnx_path, Path(tmp) / "int8.onnx", [s.inputs for s in specs])
        bound = _tolerance(precision, onnx_path, module, batches) if tolerance is None else tolerance
        t0 = time.perf_counter()
        named = str(checkpoint.resolve()) if ModelSource.parse(parent).local else parent  # as an ONNX export names it
        ir = convert_ir(onnx_path, Path(tmp) / "ir" / output.name, {schema.PARENT: named})
        convert_s = time.perf_counter() - t0
        worst = max_abs_diff(compile_ir(ir), module, batches)
        if not worst <= bound:
            raise ExportError(
                f"the OpenVINO {precision} model of {source} differs from PyTorch by up to {worst:.3g} "
                f"(> {bound:.3g}) on {len(specs)} validation samples; nothing written"
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        for f in (ir, ir.with_suffix(".bin")):
            shutil.move(str(f), output.with_suffix(f.suffix))
    report = ExportReport(
        path=str(output),
        opset=fp32.opset,
        inputs=fp32.inputs,
        outputs=fp32.outputs,
        dynamic_batch=True,
        max_abs_diff=worst,
        checked_shapes=[list(next(iter(b.values())).shape) for b in (batches[0], batches[-1])],
        size_mb=ir_size_mb(output),
        params=fp32.params,
        export_s=fp32.export_s + convert_s,
    )
    log.info(
        "OpenVINO %s %s: %.2f MB (fp32 ONNX %.2f MB); max |OpenVINO − PyTorch| = %.3g (bound %.3g) over %d samples",
        precision,
        output,
        report.size_mb,
        fp32.size_mb,
        worst,
        bound,
        len(specs),
    )
    m = measure(checkpoint, network=output)
    if not registers(source, register):
        return Variant(report, parent, measurement=m)
    tags = {
        schema.RUNTIME: schema.RUNTIME_OPENVINO,
        schema.OPENVINO_VERSION: ov.get_version(),
        **variant_tags(report, parent),
        **m.tags(),
    }
    version = register_variant(
        task, parent, variant_name(precision), "openvino", tags, lambda folder: _copy_ir(output, folder), tracking_uri
    )
    return Variant(report, parent, model_name(task), version, m)


def _tolerance(precision: str, onnx_path: Path, module: Any, batches: list[dict[str, Any]]) -> float:
    """The default bound: fp32 1e-3; int8 ``INT8_FACTOR`` × ONNX Runtime's |INT8 − PyTorch| on the same model and
    inputs, +1e-3."""
    if precision == "fp32":
        return FP32_TOLERANCE
    import numpy as np
    import torch

    from montage.platform.export import run_session, session

    sess, worst = session(onnx_path), 0.0
    with torch.no_grad():
        for b in batches:
            worst = max(worst, float(np.abs(module(*b.values()).float().numpy() - run_session(sess, b)[0]).max()))
    factor = INT8_FACTOR["vnni" if cpu_has_vnni() else "other"]
    log.info(
        "ONNX Runtime runs the INT8 model %.3g from PyTorch fp32 (bound: %g× that + %g)", worst, factor, FP32_TOLERANCE
    )
    return factor * worst + FP32_TOLERANCE


def cpu_has_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has 8-bit dot products without saturation (AVX-512 VNNI, AVX-VNNI or AMX); False
    where it cannot tell (no ``/proc/cpuinfo``)."""
    try:
        flags = next((ln for ln in Path(cpuinfo).read_text().splitlines() if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def _copy_ir(xml: Path, folder: Path) -> None:
    """The IR's two files into the folder MLflow logs as the model (``model.xml`` + ``model.bin``)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(xml, folder / "model.xml")
    shutil.copy(xml.with_suffix(".bin"), folder / "model.bin")
