"""ONNX export of a task's inference network, checked against PyTorch with ONNX Runtime.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``onnx`` + ``onnxscript``); batch and
spatial size are dynamic where the network allows (spatial sizes as multiples of the
network's stride, e.g. 32 for a ResNet UNet). After export the file is run with
``onnxruntime`` on real validation inputs and on a second shape, and the largest absolute
difference from the PyTorch outputs is reported and bounded.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from montage.core.errors import ExportError  # defined in core: the CLI catches it without importing torch

log = logging.getLogger(__name__)


@dataclass
class ExportSpec:
    """What a task exports: the inference network, example inputs by name (in the order of
    ``forward``'s arguments), output names, and the multiple spatial sizes must be."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    multiple: int = 1


@dataclass
class ExportReport:
    path: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    dynamic_batch: bool
    max_abs_diff: float  # ONNX Runtime vs PyTorch, worst over the checked shapes
    checked_shapes: list[list[int]]
    size_mb: float
    params: int
    export_s: float


def providers() -> list[str]:
    """ONNX Runtime execution providers, fastest first (TensorRT, CUDA when present; CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] + [
        "CPUExecutionProvider"
    ]


def session(path: str | Path) -> Any:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    return ort.InferenceSession(str(path), providers=providers())


def run_session(sess: Any, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return sess.run(None, {k: v.detach().cpu().float().numpy() for k, v in inputs.items()})


def read_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (its weights are not read)."""
    import onnx

    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say which
        raise ExportError(f"{path} is not an ONNX model: {exc}") from exc
    return {p.key: p.value for p in model.metadata_props}


def write_metadata(path: str | Path, values: dict[str, str]) -> None:
    """Set ``values`` in an ONNX file's ``metadata_props`` (others are kept)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, str(path))


def _dynamic_shapes(spec: ExportSpec, dynamic_batch: bool) -> tuple[dict[int, Any], ...]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024) if dynamic_batch else None
    k = spec.multiple
    h, w = Dim("h", min=1, max=8192 // k), Dim("w", min=1, max=8192 // k)
    shapes = []
    for x in spec.inputs.values():
        dims: dict[int, Any] = {}
        if batch is not None:
            dims[0] = batch
        if x.ndim == 4:
            dims[2], dims[3] = (k * h, k * w) if k > 1 else (h, w)
        shapes.append(dims)
    return tuple(shapes)


def _other_shape(spec: ExportSpec, dynamic_batch: bool) -> dict[str, torch.Tensor]:
    """The example inputs at another batch size (when dynamic) and another spatial size."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, x in spec.inputs.items():
        b = x.shape[0] + 1 if dynamic_batch else x.shape[0]
        h, w = x.shape[2] + spec.multiple, x.shape[3] + 2 * spec.multiple
        lo, hi = float(x.min()), float(x.max())
        out[name] = torch.rand((b, x.shape[1], h, w), generator=gen) * (hi - lo) + lo
    return out


def _at_least_two_strides(x: torch.Tensor, k: int) -> torch.Tensor:
    """An example of one stride (e.g. 32 px for a /32 network) would make the exporter fix the
    size to it: resize such examples to two strides."""
    if x.ndim != 4 or (x.shape[2] >= 2 * k and x.shape[3] >= 2 * k):
        return x
    size = (max(x.shape[2], 2 * k), max(x.shape[3], 2 * k))
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (in eval mode) with every convolution → batch-norm pair folded into
    the convolution, when the network traces with ``torch.fx``; else ``module`` itself. Left
    unfolded, INT8 quantization sees the norms as separate float ops between quantize /
    dequantize pairs."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module.eval())
    except Exception as exc:  # noqa: BLE001 - control flow fx cannot trace: export as is
        log.debug("batch norms left unfolded in %s: %s", type(module).__name__, exc)
        return module


def export_onnx(
    spec: ExportSpec, path: str | Path, opset: int = 18, dynamic_batch: bool = False, tolerance: float = 1e-3
) -> ExportReport:
    """Export ``spec.module`` to ``path`` and check it with ONNX Runtime (raises
    :class:`ExportError` when the outputs differ from PyTorch by more than ``tolerance``)."""
    module = spec.module.eval().cpu()
    inputs = {k: _at_least_two_strides(v.detach().cpu().float(), spec.multiple) for k, v in spec.inputs.items()}
    if dynamic_batch:
        # torch.export may specialise a dimension whose example is 1 (harmonization's global colour
        # head came out taking a batch of 1 only, and ONNX Runtime refused a batch of 2): export from
        # a batch of at least two
        inputs = {k: v.repeat(2, *([1] * (v.ndim - 1))) if v.shape[0] == 1 else v for k, v in inputs.items()}
    spec = ExportSpec(module, inputs, spec.outputs, spec.multiple)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # axis-renaming notices of the exporter
            program = torch.onnx.export(
                fold_batchnorm(module),
                tuple(inputs.values()),
                dynamo=True,
                opset_version=opset,
                input_names=list(inputs),
                output_names=spec.outputs,
                dynamic_shapes=_dynamic_shapes(spec, dynamic_batch),
                verbose=False,
            )
        program.save(str(path))
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; name what failed
        raise ExportError(f"torch.onnx.export of {type(module).__name__} failed: {exc}") from exc
    export_s = time.perf_counter() - t0
    sess = session(path)
    worst, shapes = 0.0, []
    with torch.no_grad():
        for batch in (inputs, _other_shape(spec, dynamic_batch)):
            ref = module(*batch.values())
            refs = ref if isinstance(ref, (tuple, list)) else (ref,)
            outs = run_session(sess, batch)
            for r, o in zip(refs, outs):
                if tuple(r.shape) != o.shape:
                    raise ExportError(
                        f"ONNX output shape {o.shape} differs from PyTorch's {tuple(r.shape)} for inputs "
                        f"{[list(v.shape) for v in batch.values()]}"
                    )
                worst = max(worst, float(np.abs(r.float().numpy() - o).max()))
            shapes.append(list(next(iter(batch.values())).shape))
    if not worst <= tolerance:
        raise ExportError(f"the ONNX model differs from PyTorch by up to {worst:.3g} (> {tolerance:g}) on {shapes}")
    report = ExportReport(
        path=str(path),
        opset=opset,
        inputs=list(inputs),
        outputs=spec.outputs,
        dynamic_batch=dynamic_batch,
        max_abs_diff=worst,
        checked_shapes=shapes,
        size_mb=path.stat().st_size / 2**20,
        params=sum(p.numel() for p in module.parameters()),
        export_s=export_s,
    )
    log.info(
        "exported %s (%.2f MB, %d parameters) in %.1f s; max |ONNX − PyTorch| = %.2g on %s",
        path,
        report.size_mb,
        report.params,
        export_s,
        worst,
        shapes,
    )
    return report


def quantize_int8(
    onnx_path: str | Path, output: str | Path, calibration: list[dict[str, torch.Tensor]], per_channel: bool = True
) -> Path:
    """Static INT8 quantization (QDQ, signed 8-bit activations and weights, per-channel weights)
    of an ONNX model with ONNX Runtime, calibrated (min/max) on ``calibration`` inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("the calibration set is empty: INT8 quantization needs representative inputs")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {k: v.detach().cpu().float().numpy() for k, v in item.items()}

    prepared = output.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
    mb_in, mb_out = Path(onnx_path).stat().st_size / 2**20, output.stat().st_size / 2**20
    log.info(
        "quantized %s → %s (%.2f → %.2f MB) on %d calibration inputs",
        onnx_path,
        output,
        mb_in,
        mb_out,
        len(calibration),
    )
    return output


def convert_fp16(onnx_path: str | Path, output: str | Path) -> Path:
    """The ONNX model with its weights and computation in float16 (inputs and outputs stay
    float32): the format for GPU execution providers (CUDA, TensorRT); on a CPU most kernels
    run it through casts, slower than fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(output))
    log.info(
        "fp16 %s → %s (%.2f → %.2f MB)",
        onnx_path,
        output,
        Path(onnx_path).stat().st_size / 2**20,
        output.stat().st_size / 2**20,
    )
    return output
