"""OpenVINO as a runtime next to ONNX Runtime: an ONNX export (fp32, or ONNX Runtime's INT8 QDQ
model, whose quantize/dequantize pairs OpenVINO runs as INT8) converted to OpenVINO IR
(``openvino.convert_model`` + ``openvino.save_model``: ``.xml`` + ``.bin``, the parent it was made
from in the IR's ``rt_info``), compiled for the CPU, checked against PyTorch on the same inputs as
the ONNX path, and timed beside ONNX Runtime.

:class:`OpenVINONet` stands in for a task's PyTorch network inside its predictor, as
:class:`~montage.platform.inference.OnnxNet` does for ONNX Runtime.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from montage.platform.export import ExportError, ExportSpec, run_session, session

log = logging.getLogger(__name__)


@dataclass
class OpenVINOReport:
    path: str
    onnx: str
    max_abs_diff: float  # |OpenVINO − PyTorch| on the example inputs
    size_mb: float
    convert_s: float
    latency_ms: float  # OpenVINO, median of the timed runs at the example's shape
    onnxruntime_ms: float  # ONNX Runtime on the same file and inputs
    device: str = "CPU"


def compile_ir(path: str | Path, device: str = "CPU", precision: str = "f32") -> Any:
    """The IR compiled for ``device``. ``precision``: the inference precision hint; OpenVINO's CPU
    plugin otherwise picks bf16 on CPUs with native bf16 (AMX / AVX-512 BF16), ~1e-3 off float32."""
    import openvino as ov

    if not Path(path).is_file():
        raise FileNotFoundError(f"no OpenVINO model at {path}")
    return ov.Core().compile_model(str(path), device, {"INFERENCE_PRECISION_HINT": precision})


def run_compiled(compiled: Any, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    result = compiled({k: v.detach().cpu().float().numpy() for k, v in inputs.items()})
    return [np.asarray(result[out]) for out in compiled.outputs]


def _median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm-up (first inference compiles kernels for the shape)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def convert_ir(onnx_path: str | Path, output: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``onnx_path`` converted to OpenVINO IR at ``output`` (``.xml``, its weights beside it as ``.bin``,
    float32: ``compress_to_fp16=False``), ``metadata`` written into the IR's ``rt_info``. Raises
    :class:`ExportError` naming the file when OpenVINO cannot convert it."""
    import openvino as ov

    output = Path(output).with_suffix(".xml")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = ov.convert_model(str(onnx_path))
        for key, value in (metadata or {}).items():
            model.set_rt_info(str(value), [key])
        ov.save_model(model, str(output), compress_to_fp16=False)
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; name what failed
        raise ExportError(f"OpenVINO could not convert {onnx_path}: {exc}") from exc
    return output


def read_ir_metadata(path: str | Path, key: str) -> str:
    """The value of ``key`` in an IR's ``rt_info`` ("" when it has none)."""
    import openvino as ov

    if not Path(path).is_file():
        raise FileNotFoundError(f"no OpenVINO model at {path}")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, or its .bin missing: say which
        raise ExportError(f"{path} is not an OpenVINO IR model (with its .bin beside it): {exc}") from exc
    return model.get_rt_info([key]).astype(str) if model.has_rt_info([key]) else ""


def ir_size_mb(path: str | Path) -> float:
    """An IR's size: the ``.xml`` and its ``.bin``."""
    xml = Path(path)
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20


def max_abs_diff(compiled: Any, module: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """The largest |OpenVINO − PyTorch| of ``compiled`` against ``module`` over ``batches`` (raises
    :class:`ExportError` when an output's shape differs)."""
    module = module.eval().cpu()
    worst = 0.0
    for batch in batches:
        inputs = {k: v.detach().cpu().float() for k, v in batch.items()}
        with torch.no_grad():
            ref = module(*inputs.values())
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        for r, o in zip(refs, run_compiled(compiled, inputs)):
            if tuple(r.shape) != o.shape:
                raise ExportError(
                    f"OpenVINO output shape {o.shape} differs from PyTorch's {tuple(r.shape)} for inputs "
                    f"{[list(v.shape) for v in inputs.values()]}"
                )
            worst = max(worst, float(np.abs(r.float().numpy() - o).max()))
    return worst


def to_openvino(
    spec: ExportSpec, onnx_path: str | Path, output: str | Path, tolerance: float = 1e-3, repeats: int = 10
) -> OpenVINOReport:
    """Convert ``onnx_path`` (the ONNX export of ``spec.module``) to OpenVINO IR at ``output``
    (``.xml``), check it against PyTorch on ``spec.inputs`` (raises :class:`ExportError` beyond
    ``tolerance``) and time it beside ONNX Runtime."""
    t0 = time.perf_counter()
    output = convert_ir(onnx_path, output)
    convert_s = time.perf_counter() - t0
    compiled = compile_ir(output)
    inputs = {k: v.detach().cpu().float() for k, v in spec.inputs.items()}
    worst = max_abs_diff(compiled, spec.module, [inputs])
    if not worst <= tolerance:
        raise ExportError(f"the OpenVINO model differs from PyTorch by up to {worst:.3g} (> {tolerance:g})")
    sess = session(onnx_path)
    report = OpenVINOReport(
        path=str(output),
        onnx=str(onnx_path),
        max_abs_diff=worst,
        size_mb=ir_size_mb(output),
        convert_s=convert_s,
        latency_ms=_median_ms(lambda: run_compiled(compiled, inputs), repeats),
        onnxruntime_ms=_median_ms(lambda: run_session(sess, inputs), repeats),
    )
    log.info(
        "OpenVINO %s: max |OpenVINO − PyTorch| = %.2g; %.2f ms vs ONNX Runtime %.2f ms",
        output,
        worst,
        report.latency_ms,
        report.onnxruntime_ms,
    )
    return report


class OpenVINONet(nn.Module):
    """An OpenVINO-compiled network in place of the PyTorch one inside a task's predictor;
    ``path`` is an IR ``.xml`` or an ONNX file (OpenVINO reads ONNX directly)."""

    def __init__(self, path: str | Path, device: str = "CPU") -> None:
        super().__init__()
        self.path = str(path)
        self.compiled = compile_ir(path, device)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = run_compiled(self.compiled, dict(zip(self.input_names, xs)))[0]
        return torch.from_numpy(out).to(xs[0].device)

    def transform(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.forward(*xs)


def load_openvino_predictor(path: str | Path, checkpoint: str | Path, task: str | None = None) -> Any:
    """A task's predictor whose exported network (an IR ``.xml``, or an ONNX file) runs in OpenVINO
    (CPU); ``checkpoint`` (the model it was made from) supplies the config."""
    from montage.platform.inference import load_for_inference

    inst, nets = load_for_inference(checkpoint, task, "cpu")
    nets = {**nets, inst.export_net: OpenVINONet(path)}
    return inst.make_predictor(nets, torch.device("cpu"))
