"""Typed experiment configuration: dataclasses, YAML files and dotted overrides.

The dataclasses below are the single source of truth for every key a user can set. A
task contributes its own ``model``, ``data`` and ``loss`` sections (and may replace any
platform section) through :class:`SectionSpec`; everything else is shared.

Resolution order: dataclass defaults → task defaults → YAML file → ``key=value`` overrides.
Unknown keys and values of the wrong type raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


# ----------------------------------------------------------------------------- sections


@dataclass
class OptimConfig:
    """Optimizer of every network the task trains (a task may add per-network fields)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class SchedConfig:
    """Learning-rate schedule.

    ``cosine_restarts``: CosineAnnealingWarmRestarts(T_0=t0, T_mult=t_mult, eta_min), per epoch.
    ``linear_decay``: constant for ``constant_epochs`` then linear to 0 at ``train.epochs``, per epoch.
    ``onecycle``: per optimizer step over the whole run: linear warm-up from lr/25 to ``optim.lr``
    during the first ``warmup`` fraction of the steps, then cosine down to lr/(25·10⁴)
    (OneCycleLR; the right choice for short runs of a few hundred steps).
    """

    name: Literal["none", "cosine_restarts", "linear_decay", "onecycle"] = "cosine_restarts"
    t0: int = 10
    t_mult: int = 1
    eta_min: float = 1e-6
    constant_epochs: int = 0
    warmup: float = 0.25  # onecycle: fraction of the run's steps spent warming up

    def __post_init__(self) -> None:
        if self.t0 < 1 or self.t_mult < 1:
            raise ValueError("t0 and t_mult must be >= 1")
        if not 0 < self.warmup < 1:
            raise ValueError(f"warmup must be in (0, 1), got {self.warmup}")

    @property
    def per_step(self) -> bool:
        """True when the schedule advances every optimizer step instead of every epoch."""
        return self.name == "onecycle"


@dataclass
class TrainConfig:
    """The generic loop's knobs."""

    epochs: int = 10
    batch_size: int = 8
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    pause_after: int = 0  # end this invocation once this many epochs are done (continue with --resume); the schedule still spans `epochs`
    check_replicas: int = 0  # DDP debugging: every N optimizer steps, fail unless all ranks hold identical weights
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto = bf16 on CUDA if supported
    early_stop: int = 0  # patience in epochs without improvement of the monitor; 0 = off
    seed: int = 0
    loader_workers: int = 2
    max_steps: int = 0  # cap on train batches per epoch; 0 = the whole epoch
    max_val_steps: int = 0  # cap on val batches; 0 = the whole val set
    sample_every: int = 1  # epochs between sample grids logged; 0 = never
    checkpoint_every: int = 0  # also keep a checkpoint every K epochs; 0 = best/latest only
    channels_last: bool = False  # NHWC tensors and weights (faster convolutions on tensor cores)
    cudnn_benchmark: bool = True  # CUDA: pick the fastest conv algorithms for the (fixed) input size
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"  # torch.compile mode
    compile_backend: str = "inductor"  # torch.compile backend (inductor needs a C++ compiler on CPU)
    cache_data: bool = False  # decode + resize every sample once, up front, into memory (small datasets)
    progress: bool = True  # tqdm bar per epoch on rank 0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "accumulate"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.grad_clip < 0 or self.early_stop < 0 or self.loader_workers < 0:
            raise ValueError("grad_clip, early_stop and loader_workers must be >= 0")


@dataclass
class ScalingConfig:
    """Ray Train scaling: ``workers`` DDP processes, each with these resources."""

    workers: int = 1
    gpus: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts from the latest checkpoint after a failure
    keep_checkpoints: int = 2  # checkpoints kept on storage: the best by the task's metric, and the latest
    sync_batchnorm: bool = False  # GPUs: batch-norm statistics over the global batch (SyncBatchNorm)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")


@dataclass
class RunConfig:
    """Where a run lives: ``<storage>/<name>`` (a local path, NFS mount, s3:// or gs://)."""

    name: str = ""  # empty: <task>-<timestamp>
    storage: str = "runs"


@dataclass
class TrackingConfig:
    """MLflow tracking. ``uri`` empty: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db."""

    enabled: bool = True
    uri: str = ""
    artifacts: str = "mlartifacts"  # artifact root for a new experiment on a local store
    experiment: str = ""  # empty: montage-<task>
    log_model: bool = True
    parent_run_id: str = ""  # set by tune: the sweep's parent run
    run_id: str = ""  # log into this run (set by the launchers: restarts and resumes keep one run)


@dataclass
class DistillConfig:
    """Knowledge distillation: train against a teacher's outputs as well as the labels.
    ``teacher``: a checkpoint path or ``models:/montage-<task>@champion`` (empty: off); the
    loss term ``distill`` (soft-target KL for segmentation logits at ``temperature``, L1 to the
    teacher's images for harmonization and pix2pix) enters the total with ``weight``."""

    teacher: str = ""
    weight: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0:
            raise ValueError(f"distill: weight must be >= 0 and temperature > 0, got {self.weight}, {self.temperature}")


@dataclass
class ExperimentConfig:
    task: str
    model: Any
    data: Any
    loss: Any
    optim: Any = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass(frozen=True)
class SectionSpec:
    """What a task adds to the configuration."""

    model: type
    data: type
    loss: type
    optim: type = OptimConfig
    defaults: dict[str, Any] = field(default_factory=dict)  # dotted key → value

    def section_types(self) -> dict[str, type]:
        return {"model": self.model, "data": self.data, "loss": self.loss, "optim": self.optim}


# ------------------------------------------------------------------- dict <-> dataclass


def to_dict(obj: Any) -> Any:
    """Dataclass tree → plain dicts/lists (tuples become lists, YAML and JSON friendly)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and ("off" if not value else "on") in args:
            value = "off" if not value else "on"  # YAML 1.1 reads a bare off/on (and no/yes) as a bool
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - a section declared a type this loader does not know
        raise ConfigError(f"{key}: unsupported config type {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, validating every key and value."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{full}' (valid in {prefix or 'top level'}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name in data:
            full = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], full)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


# ------------------------------------------------------------------- overrides and files


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.dice=0.5"`` → ``("loss.dice", 0.5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from exc
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key == "a.b.c"``, naming the bad part on error."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            if child is None and part not in node:
                valid = ", ".join(k for k in node)
                raise ConfigError(f"unknown config key '{where}' (valid here: {valid})")
            raise ConfigError(f"config key '{where}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` (unknown keys are kept for validation)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def default_tree(task: str, spec: SectionSpec) -> dict[str, Any]:
    tree = to_dict(ExperimentConfig(task=task, model=spec.model(), data=spec.data(), loss=spec.loss(), optim=spec.optim()))
    for key, value in spec.defaults.items():
        set_dotted(tree, key, value)
    return tree


def build_config(task: str, spec: SectionSpec, tree: dict[str, Any]) -> ExperimentConfig:
    """Validate a full or partial config tree for ``task`` into an :class:`ExperimentConfig`."""
    if tree.get("task", task) != task:
        raise ConfigError(f"config is for task '{tree['task']}', not '{task}'")
    full = merge(default_tree(task, spec), {k: v for k, v in tree.items() if k != "task"})
    sections = spec.section_types()
    for key in full:
        if key not in {f.name for f in dataclasses.fields(ExperimentConfig)}:
            valid = ", ".join(f.name for f in dataclasses.fields(ExperimentConfig))
            raise ConfigError(f"unknown config key '{key}' (valid at top level: {valid})")
    kwargs: dict[str, Any] = {"task": task}
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "task":
            continue
        cls = sections.get(f.name, hints[f.name])
        kwargs[f.name] = _coerce(full[f.name], cls, f.name)
    return ExperimentConfig(**kwargs)


def load_config(
    task: str,
    spec: SectionSpec,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """Defaults → YAML ``path`` → ``key=value`` ``overrides``, validated."""
    tree = default_tree(task, spec)
    if path is not None:
        tree = merge(tree, read_yaml(path))
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build_config(task, spec, tree)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
