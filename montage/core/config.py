"""Typed configuration of every config file type: dataclasses, YAML files and dotted overrides.

The section dataclasses are the single source of truth for every key a user can set: training
(:mod:`montage.core.sections`, assembled here into :class:`ExperimentConfig`), tune
(:mod:`montage.core.tune_sections`) and serve (:mod:`montage.core.serve_sections`). A task
contributes its own ``model``, ``data`` and ``loss`` sections (and may replace any platform
section) through :class:`SectionSpec`; everything else is shared.

One loader reads them all: :func:`defaults_of` (the dataclass defaults as a tree) → :func:`read_tree`
(a YAML file, deep-merged) → :func:`apply_overrides` (``key=value``) → validation, in
:func:`load_file` for any section dataclass and :func:`load_config` for a task's training config
(whose defaults also hold the task's). Unknown keys and values of the wrong type raise
:class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from montage.core.sections import (  # noqa: F401  (re-exported: the sections are part of this module's API)
    CVConfig,
    DistillConfig,
    InitConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    SchedConfig,
    TrackingConfig,
    TrainConfig,
)


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


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
    init: InitConfig = field(default_factory=InitConfig)
    cv: CVConfig = field(default_factory=CVConfig)


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


def read_tree(path: str | Path) -> dict[str, Any]:
    """A config file's YAML mapping (not validated: that is the section dataclasses' job)."""
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


read_yaml = read_tree  # the earlier name


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str] | None) -> dict[str, Any]:
    """Set each ``a.b=c`` of ``overrides`` in ``tree`` (in place, in order; returned for chaining).
    A missing section names the unknown key and the valid ones; an unknown leaf is left for
    :func:`from_dict` to refuse the same way."""
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    return tree


def defaults_of(cls: type) -> dict[str, Any]:
    """The tree of a section dataclass's defaults (a field without one, i.e. required, is left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default_factory())
    return out


def resolve_tree(
    defaults: dict[str, Any], path: str | Path | None = None, overrides: Sequence[str] | None = None
) -> dict[str, Any]:
    """``defaults`` → the YAML file at ``path`` (deep-merged) → ``overrides``: the tree to validate."""
    tree = merge(defaults, read_tree(path)) if path is not None else dict(defaults)
    return apply_overrides(tree, overrides)


def load_file(cls: type, path: str | Path | None = None, overrides: Sequence[str] | None = None) -> Any:
    """Section dataclass ``cls`` from its defaults, the YAML file ``path`` and ``overrides``, validated."""
    return from_dict(cls, resolve_tree(defaults_of(cls), path, overrides))


def default_tree(task: str, spec: SectionSpec) -> dict[str, Any]:
    tree = to_dict(
        ExperimentConfig(task=task, model=spec.model(), data=spec.data(), loss=spec.loss(), optim=spec.optim())
    )
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
    """Defaults (the platform's, then the task's) → YAML ``path`` → ``key=value`` ``overrides``, validated."""
    return build_config(task, spec, resolve_tree(default_tree(task, spec), path, overrides))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
