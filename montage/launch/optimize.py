"""Variants that need training: a pruned network fine-tuned, a student distilled from a
teacher. Each is an ordinary training run (Ray Train, or in this process), tracked in MLflow,
then measured against its parent and registered as a new version of ``montage-<task>``.

``montage optimize <task> --method prune|distill``; quantization (no training) lives in
:mod:`montage.tracking.variants`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from montage.core import schema
from montage.core.config import ExperimentConfig, apply_overrides, build_config, to_dict
from montage.core.registry import TASKS
from montage.core.sources import ModelSource
from montage.platform.checkpoint import load_checkpoint, save_checkpoint
from montage.platform.pruning import PruneReport, count_params, prune_channels, prune_magnitude
from montage.platform.runner import RunSummary
from montage.tracking.registry import model_name, register_checkpoint
from montage.tracking.variants import Measurement, measure, registers, tag_version, validation_batch, variant_parent

log = logging.getLogger(__name__)


@dataclass
class TrainedVariant:
    """A pruned or distilled variant: its run, its best checkpoint, what it was measured at."""

    variant: str  # pruned-0.5 | sparse-0.5 | student
    parent: str
    checkpoint: str
    params: int
    parent_params: int
    measurement: Measurement
    run_dir: str = ""
    mlflow_run_id: str | None = None
    registered: str = ""
    prune: PruneReport | None = None
    overrides: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["measurement"]["delta"] = self.measurement.delta
        out["params_ratio"] = self.parent_params / max(1, self.params)
        return {k: v for k, v in out.items() if v not in (None, "", [])}


def _config(task: str, state: dict[str, Any], overrides: Sequence[str]) -> ExperimentConfig:
    tree = to_dict(build_config(task, TASKS.get(task).spec, state["config"]))
    tree["distill"]["teacher"], tree["init"]["checkpoint"] = "", ""
    tree["run"]["name"] = ""
    tree["tracking"]["run_id"], tree["tracking"]["parent_run_id"] = "", ""  # a run of its own, not the parent's
    return build_config(task, TASKS.get(task).spec, apply_overrides(tree, overrides))


def _fit(cfg: ExperimentConfig, no_ray: bool, address: str | None) -> RunSummary:
    if no_ray:
        from montage.launch.local import fit_local

        summary = fit_local(cfg)
    else:
        from montage.launch.train import fit_ray

        summary = fit_ray(cfg, address=address)
    if summary.error or not summary.best_checkpoint:
        raise RuntimeError(f"the training run of the variant failed: {summary.error or 'no checkpoint was written'}")
    return summary


def _params(checkpoint: str | Path, task: str) -> int:
    """Parameters of a checkpoint's inference network (the one a deployment runs)."""
    from montage.platform.inference import load_for_inference

    inst, nets = load_for_inference(checkpoint, task=task)
    return count_params(nets[inst.export_net])


def _register(task: str, variant: TrainedVariant, cfg: ExperimentConfig, extra: dict[str, str]) -> str:
    m = variant.measurement
    reg = register_checkpoint(
        cfg,
        variant.checkpoint,
        variant.mlflow_run_id or "",
        m.metric,
        m.mode,
        m.value,
        sweep="",
        params={},
        promote="never",
    )
    size_mb = Path(variant.checkpoint).stat().st_size / 2**20
    tags = {
        schema.VARIANT: variant.variant,
        schema.RUNTIME: schema.RUNTIME_TORCH,
        schema.PARENT: variant.parent,
        schema.PARAMS: str(variant.params),
        schema.PARENT_PARAMS: str(variant.parent_params),
        schema.SIZE_MB: f"{size_mb:.3f}",
        **m.tags(),
        **extra,
    }
    tag_version(task, reg.version, tags, cfg.tracking.uri)
    return ModelSource.registered(model_name(task), version=reg.version).uri


def prune_model(
    task: str,
    source: ModelSource | str,
    ratio: float = 0.5,
    mode: str = "channels",
    epochs: int = 2,
    overrides: Sequence[str] = (),
    tracking_uri: str = "",
    register: bool | None = None,
    no_ray: bool = False,
    address: str | None = None,
) -> TrainedVariant:
    """Prune ``source``'s inference network (``channels``: Torch-Pruning, structured; or
    ``magnitude``: unstructured L1, ``torch.nn.utils.prune``), fine-tune it for ``epochs``
    through the normal training loop (channels only: training would refill magnitude pruning's
    zeros), measure it against the parent and register it (default: when the source is a
    registered model) as variant ``pruned-<ratio>`` / ``sparse-<ratio>``."""
    from montage.platform.inference import load_for_inference

    if mode not in ("channels", "magnitude"):
        raise ValueError(f"--prune-mode: unknown '{mode}'; valid: channels, magnitude")
    if epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {epochs}")
    source = ModelSource.parse(source, "--source")
    parent, checkpoint = variant_parent(source, tracking_uri)
    state = load_checkpoint(checkpoint, task=task)
    inst, nets = load_for_inference(checkpoint, task=task, device="cpu")
    spec = inst.export_spec(nets, validation_batch(inst, 2))
    parent_params = count_params(nets[inst.export_net])
    prune = prune_channels if mode == "channels" else prune_magnitude
    report = prune(spec.module, tuple(spec.inputs.values()), ratio)
    name = f"{'pruned' if mode == 'channels' else 'sparse'}-{ratio:g}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    over = [f"tracking.uri={tracking_uri}", f"run.name={task}-{name}-{stamp}", *overrides]
    cfg = _config(task, state, over)
    run_dir = Path(cfg.run.storage) / cfg.run.name
    # beside the run's folder, not in it: Ray Train owns that folder
    pruned = save_checkpoint(
        {"task": task, "config": state["config"], "nets": {k: v.state_dict() for k, v in nets.items()}},
        run_dir.with_name(f"{cfg.run.name}-pruned.pt"),
    )
    summary, best = None, str(pruned)
    if epochs and mode == "channels":
        cfg.init.checkpoint, cfg.train.epochs = str(pruned.resolve()), epochs
        summary = _fit(cfg, no_ray, address)
        best = summary.best_checkpoint
    m = measure(checkpoint, best)
    variant = TrainedVariant(
        name,
        parent,
        best,
        _params(best, task),
        parent_params,
        m,
        run_dir=summary.run_dir if summary else str(run_dir),
        mlflow_run_id=summary.mlflow_run_id if summary else None,
        prune=report,
        overrides=list(overrides),
    )
    if registers(source, register):
        if variant.mlflow_run_id is None:
            raise ValueError(
                "registering a variant needs its MLflow run: fine-tune it (--epochs > 0, tracking on) or pass "
                "--no-register"
            )
        variant.registered = _register(task, variant, cfg, {schema.PRUNE_MODE: mode, schema.PRUNE_RATIO: f"{ratio:g}"})
    return variant


def distill_model(
    task: str,
    source: ModelSource | str,
    student: Sequence[str] = (),
    weight: float = 1.0,
    temperature: float = 2.0,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    tracking_uri: str = "",
    register: bool | None = None,
    no_ray: bool = False,
    address: str | None = None,
) -> TrainedVariant:
    """Train a student (the teacher's config with ``student`` overrides; default: the task's
    smaller model) against ``source`` as the teacher (``distill.*``) and the labels, measure it
    against the teacher and register it (default: when the source is registered) as ``student``."""

    source = ModelSource.parse(source, "--source")
    parent, checkpoint = variant_parent(source, tracking_uri)
    state = load_checkpoint(checkpoint, task=task)
    teacher_cfg = build_config(task, TASKS.get(task).spec, state["config"])
    student = list(student) or TASKS.get(task)(teacher_cfg).student_overrides()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    over = [
        *student,
        f"tracking.uri={tracking_uri}",
        f"run.name={task}-student-{stamp}",
        f"distill.weight={weight}",
        f"distill.temperature={temperature}",
    ]
    if epochs is not None:
        over.append(f"train.epochs={epochs}")
    cfg = _config(task, state, [*over, *overrides])
    cfg.distill.teacher = str(Path(checkpoint).resolve())
    summary = _fit(cfg, no_ray, address)
    m = measure(checkpoint, summary.best_checkpoint)
    variant = TrainedVariant(
        "student",
        parent,
        str(summary.best_checkpoint),
        _params(summary.best_checkpoint, task),
        _params(checkpoint, task),
        m,
        run_dir=summary.run_dir,
        mlflow_run_id=summary.mlflow_run_id,
        overrides=student,
    )
    if registers(source, register):
        if variant.mlflow_run_id is None:
            raise ValueError("registering a student needs its MLflow run (tracking.enabled=true) or --no-register")
        variant.registered = _register(
            task, variant, cfg, {schema.STUDENT: " ".join(student), schema.DISTILL_WEIGHT: f"{weight:g}"}
        )
    return variant
