"""Deployment variants of a registered model: export a version (or a checkpoint) to ONNX,
check it, and register the result as a new version of ``montage-<task>`` with tags saying what
it is (variant, runtime, size, parameters, the largest difference from its parent). The OpenVINO
variant, built on the same pieces, is :mod:`montage.tracking.ov_variant`."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from montage.core import schema
from montage.core.sources import ModelSource
from montage.platform.export import ExportReport, export_onnx, write_metadata
from montage.tracking.registry import client, model_name
from montage.tracking.runs import get_experiment_id, resolve_tracking_uri
from montage.tracking.sources import resolve_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """An exported model and, when registered, its version."""

    report: ExportReport
    parent: str  # the source it was made from (models:/name/N for a registered version, else the path)
    name: str = ""
    version: str = ""
    measurement: Measurement | None = None


def validation_specs(inst: Any, nets: dict[str, Any], samples: int) -> list[Any]:
    """The task's export spec at each of the first ``samples`` validation samples (batch 1): the
    calibration and check inputs of the INT8 and OpenVINO variants."""
    from torch.utils.data import DataLoader

    if samples < 1:
        raise ValueError(f"--samples must be >= 1 (the calibration set), got {samples}")
    validation_batch(inst)  # a clear error when the validation data cannot be built
    loader = DataLoader(inst.datasets()[1], batch_size=1, shuffle=False)
    return [inst.export_spec(nets, b) for b, _ in zip(loader, range(samples))]


def validation_batch(inst: Any, size: int = 2) -> dict[str, Any]:
    """The first ``size`` validation samples of the checkpoint's own data config."""
    from torch.utils.data import DataLoader

    try:
        val = inst.datasets()[1]
    except Exception as exc:  # noqa: BLE001 - say which data is missing, not a deep traceback
        raise FileNotFoundError(
            f"cannot build the validation data of this checkpoint's config to check the export: {exc}"
        ) from exc
    if len(val) == 0:
        raise ValueError("the validation set is empty: nothing to check the export on")
    return next(iter(DataLoader(val, batch_size=min(size, len(val)), shuffle=False)))


def export_model(
    task: str,
    source: ModelSource | str,
    output: str | Path,
    opset: int = 18,
    dynamic_batch: bool = False,
    tracking_uri: str = "",
    register: bool | None = None,
) -> Variant:
    """Export ``source`` (a registry version or alias, or a checkpoint) of ``task`` to ONNX at
    ``output``, checked with ONNX Runtime on validation inputs; register it (default: when
    the source is a registered model) as a new version tagged ``variant=onnx``. The file names
    its parent in its metadata (``montage.parent``), so it can be served on its own."""
    from montage.platform.inference import load_for_inference

    source = ModelSource.parse(source, "--source")
    parent, checkpoint = variant_parent(source, tracking_uri)
    inst, nets = load_for_inference(checkpoint, task=task, device="cpu")
    batch = validation_batch(inst, size=2 if dynamic_batch else 1)  # a static batch is fixed at the example's
    report = export_onnx(inst.export_spec(nets, batch), output, opset=opset, dynamic_batch=dynamic_batch)
    _name_parent(report.path, parent, checkpoint)
    m = measure(checkpoint, network=report.path)
    if not registers(source, register):
        return Variant(report, parent, measurement=m)
    version = register_onnx(task, Path(report.path), parent, report, tracking_uri, extra_tags=m.tags())
    return Variant(report, parent, model_name(task), version, m)


def registers(source: ModelSource, register: bool | None) -> bool:
    """Whether a variant of ``source`` is registered: as asked, by default when the source is a registered model."""
    return source.in_registry if register is None else register


def variant_parent(source: ModelSource, tracking_uri: str) -> tuple[str, Path]:
    """(the parent a variant records: models:/name/N for a registry source (an alias: the version it
    names now), else the checkpoint's path; the local checkpoint). An ONNX or OpenVINO source has no
    weights to make a variant from."""
    resolved = resolve_source(source, tracking_uri)
    if resolved.exported is not None:
        kind = "an OpenVINO" if resolved.ir is not None else "an ONNX"
        raise ValueError(f"{source} is {kind} model already: make the variant from the checkpoint it was made from")
    return resolved.pinned.uri, resolved.checkpoint


def _name_parent(onnx_path: str | Path, parent: str, checkpoint: Path) -> None:
    """Write the parent into the ONNX file's metadata (a local checkpoint by its absolute path)."""
    local = ModelSource.parse(parent).local
    write_metadata(onnx_path, {schema.PARENT: str(checkpoint.resolve()) if local else parent})


def quantize_model(
    task: str,
    source: ModelSource | str,
    output: str | Path,
    samples: int = 32,
    tracking_uri: str = "",
    register: bool | None = None,
    precision: str = "int8",
) -> Variant:
    """``precision`` int8: static INT8 (QDQ, per-channel) of ``source``'s exported network,
    calibrated on ``samples`` validation samples; fp16: its weights and activations in half
    precision (inputs and outputs stay float32; for GPU execution providers). Checked against
    the fp32 PyTorch network on those samples; registered (default: when the source is a
    registered model) as a variant named after the precision."""
    import numpy as np
    import torch

    from montage.platform.export import convert_fp16, quantize_int8, run_session, session
    from montage.platform.inference import load_for_inference

    if precision not in ("int8", "fp16"):
        raise ValueError(f"--precision: unknown '{precision}'; valid: int8, fp16")
    if samples < 1:
        raise ValueError(f"--samples must be >= 1 (the calibration set), got {samples}")
    source = ModelSource.parse(source, "--source")
    parent, checkpoint = variant_parent(source, tracking_uri)
    inst, nets = load_for_inference(checkpoint, task=task, device="cpu")
    specs = validation_specs(inst, nets, samples)
    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(specs[0], Path(tmp) / "fp32.onnx", dynamic_batch=True)
        if precision == "int8":
            quantize_int8(fp32.path, output, [s.inputs for s in specs])
        else:
            convert_fp16(fp32.path, output)
    _name_parent(output, parent, checkpoint)
    sess, module, worst = session(output), specs[0].module.eval(), 0.0
    with torch.no_grad():
        for s in specs:
            ref = module(*s.inputs.values()).float().numpy()
            worst = max(worst, float(np.abs(ref - run_session(sess, s.inputs)[0]).max()))
    report = ExportReport(
        path=str(output),
        opset=fp32.opset,
        inputs=fp32.inputs,
        outputs=fp32.outputs,
        dynamic_batch=True,
        max_abs_diff=worst,
        checked_shapes=[list(next(iter(s.inputs.values())).shape) for s in specs[:2]],
        size_mb=output.stat().st_size / 2**20,
        params=fp32.params,
        export_s=fp32.export_s,
    )
    log.info(
        "%s %s: %.2f MB (fp32 ONNX %.2f MB); max |%s − PyTorch fp32| = %.3g over %d samples",
        precision,
        output,
        report.size_mb,
        fp32.size_mb,
        precision,
        worst,
        len(specs),
    )
    m = measure(checkpoint, network=output)
    if not registers(source, register):
        return Variant(report, parent, measurement=m)
    return Variant(
        report,
        parent,
        model_name(task),
        register_onnx(task, output, parent, report, tracking_uri, variant=precision, extra_tags=m.tags()),
        m,
    )


def register_onnx(
    task: str,
    onnx_path: Path,
    parent: str,
    report: ExportReport,
    tracking_uri: str = "",
    variant: str = "onnx",
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log ``onnx_path`` as an MLflow ONNX model and register it as a new version of
    ``montage-<task>`` (no alias moves: promoting stays the user's choice)."""
    import mlflow
    import onnx

    def write(folder: Path) -> None:
        mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(folder))

    tags = {schema.RUNTIME: schema.RUNTIME_ONNX, **variant_tags(report, parent), **(extra_tags or {})}
    return register_variant(task, parent, variant, "onnx", tags, write, tracking_uri, f"export-{onnx_path.stem}")


def variant_tags(report: ExportReport, parent: str) -> dict[str, str]:
    """The tags of an exported variant's report (its runtime and measurement are the caller's)."""
    return {
        schema.PARENT: parent,
        schema.OPSET: str(report.opset),
        schema.SIZE_MB: f"{report.size_mb:.3f}",
        schema.PARAMS: str(report.params),
        schema.MAX_ABS_DIFF: f"{report.max_abs_diff:.3g}",
        schema.DYNAMIC_BATCH: str(report.dynamic_batch).lower(),
    }


def register_variant(
    task: str,
    parent: str,
    variant: str,
    model_type: str,
    tags: dict[str, str],
    write: Callable[[Path], None],
    tracking_uri: str = "",
    run_name: str = "",
) -> str:
    """Log the files ``write`` puts into a folder as an MLflow logged model (``model_type``) under the
    parent's run (a registry parent) or an export run of its own (``run_name``), and register it as a
    new version of ``montage-<task>`` tagged ``variant`` and ``tags`` (no alias moves: promoting stays
    the user's choice)."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    mlc = client(tracking_uri)
    name = model_name(task)
    run_id = None
    psource = ModelSource.parse(parent, "the parent")
    if psource.in_registry:
        run_id = mlc.get_model_version(psource.name, psource.version).run_id
    if run_id is None:
        exp = get_experiment_id(mlc, f"montage-{task}", "mlartifacts", resolve_tracking_uri(tracking_uri))
        run_id = mlc.create_run(
            exp, run_name=run_name or f"export-{variant}", tags={schema.TASK: task, schema.ROLE: "export"}
        ).info.run_id
        mlc.set_terminated(run_id, "FINISHED")
    tags = {schema.VARIANT: variant, **tags}
    run = mlc.get_run(run_id)
    if run.data.tags.get(schema.DATA_DIGEST):  # the parent's training data
        tags[schema.DATA_DIGEST] = run.data.tags[schema.DATA_DIGEST]
    experiment_id = run.info.experiment_id
    model = mlc.create_logged_model(experiment_id, name=variant, source_run_id=run_id, tags=tags, model_type=model_type)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        write(local)
        mlc.log_model_artifacts(model.model_id, str(local))
    mlc.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    try:
        mlc.create_registered_model(name)
    except MlflowException as exc:
        if "ALREADY_EXISTS" not in str(exc.error_code):
            raise
    mv = mlc.create_model_version(name, source=model.artifact_location, run_id=run_id, tags=tags)
    log.info(
        "registered %s version %s: %s of %s (%s)",
        name,
        mv.version,
        variant,
        parent,
        ", ".join(f"{k[8:]}={v}" for k, v in tags.items()),
    )
    return str(mv.version)


def report_dict(variant: Variant) -> dict[str, Any]:
    out = {"parent": variant.parent, **asdict(variant.report)}
    if variant.measurement is not None:
        out["measured"] = {**asdict(variant.measurement), "delta": variant.measurement.delta}
    if variant.version:
        out["registered"] = ModelSource.registered(variant.name, version=variant.version).uri
    return out


@dataclass(frozen=True)
class Measurement:
    """A variant next to its parent on the parent's validation data, on this machine's CPU:
    the task's monitored metric and the inference network's latency at batch 1."""

    metric: str
    mode: str
    value: float
    parent_value: float
    latency_ms: float
    parent_latency_ms: float

    @property
    def delta(self) -> float:
        return self.value - self.parent_value

    def tags(self) -> dict[str, str]:
        return {
            schema.QUALITY_METRIC: self.metric,
            schema.QUALITY: f"{self.value:.6g}",
            schema.PARENT_QUALITY: f"{self.parent_value:.6g}",
            schema.QUALITY_DELTA: f"{self.delta:+.4g}",
            schema.LATENCY_MS: f"{self.latency_ms:.2f}",
            schema.PARENT_LATENCY_MS: f"{self.parent_latency_ms:.2f}",
            schema.SPEEDUP: f"{self.parent_latency_ms / self.latency_ms:.2f}",
        }


def measure(
    parent: str | Path, checkpoint: str | Path | None = None, network: str | Path | None = None, runs: int = 20
) -> Measurement:
    """Measure a variant — a checkpoint (pruned, student), or a ``network`` exported from ``parent``:
    an ONNX file (run by ONNX Runtime) or an OpenVINO IR ``.xml`` (run by OpenVINO) — against
    ``parent``: validation metric, and p50 latency at batch 1 with the two networks run in turns
    (this machine's speed drifts; turns keep the ratio fair)."""
    import torch

    from montage.platform.evaluate import evaluation_loop, latency_pair

    def prepare(ckpt: str | Path, path: str | Path | None) -> tuple[float, Any, str, str]:
        exported = exported_net(path) if path is not None else None
        loop = evaluation_loop(ckpt, exported)
        metric, mode = loop.task.monitor
        spec = loop.task.export_spec(loop.m.nets, validation_batch(loop.task, 1))  # the inputs latency is timed on
        module = exported if exported is not None else spec.module.eval()
        with torch.no_grad():
            value = loop.evaluate()[metric]
        inputs = tuple(spec.inputs.values())
        return value, lambda: module(*inputs), metric, mode

    parent_value, parent_fn, metric, mode = prepare(parent, None)
    value, fn, _, _ = prepare(checkpoint or parent, network)
    with torch.no_grad():
        parent_ms, ms = latency_pair(parent_fn, fn, runs=runs)
    m = Measurement(metric, mode, value, parent_value, ms, parent_ms)
    log.info(
        "%s %.5g (parent %.5g, %+.4g); p50 %.1f ms at batch 1 (parent %.1f ms, %.2f×)",
        metric,
        value,
        parent_value,
        m.delta,
        ms,
        parent_ms,
        parent_ms / ms,
    )
    return m


def exported_net(path: str | Path) -> Any:
    """The network of an exported file in its runtime: an IR ``.xml`` in OpenVINO, an ``.onnx`` in ONNX Runtime."""
    if Path(path).suffix.lower() == ".xml":
        from montage.platform.ov_runtime import OpenVINONet

        return OpenVINONet(path)
    from montage.platform.inference import OnnxNet

    return OnnxNet(path)


def tag_version(task: str, version: str, tags: dict[str, str], tracking_uri: str = "") -> None:
    mlc = client(tracking_uri)
    for k, v in tags.items():
        mlc.set_model_version_tag(model_name(task), version, k, v)
