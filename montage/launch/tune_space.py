"""A tune config as read and validated before any trial runs: the search space (:class:`Param`, checked
against the task's config by :func:`parse_space`) and :func:`load_tune_config`, which applies overrides,
fills in the task's metric and the trial's resources and refuses what cannot run.
:mod:`montage.launch.tune` runs the sweep."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from montage.core.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    load_file,
    parse_override,
    set_dotted,
    to_dict,
)
from montage.core.registry import TASKS
from montage.core.tune_sections import DISTRIBUTIONS, TuneConfig


@dataclass
class Param:
    key: str  # dotted config key
    kind: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @property
    def safe(self) -> str:
        """Ray flattens nested names on '/', Optuna keeps names as given: no dots in either."""
        return self.key.replace(".", "__")

    def domain(self) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)
        return tune.choice(self.values)

    def describe(self) -> str:
        return f"{self.kind}{self.values}" if self.kind == "choice" else f"{self.kind}({self.low}, {self.high})"


def parse_space(space: dict[str, dict], base: ExperimentConfig) -> list[Param]:
    """Validate the search space against the task's config (keys exist, values type-check)."""
    if not space:
        raise ConfigError("search_space is empty")
    params = []
    tree = to_dict(base)
    spec = TASKS.get(base.task).spec
    from montage.core.config import build_config

    for key, d in space.items():
        if not isinstance(d, dict) or "type" not in d:
            raise ConfigError(f"search_space.{key}: needs a mapping with 'type' ({', '.join(DISTRIBUTIONS)})")
        kind = d["type"]
        extra = set(d) - {"type", "low", "high", "values"}
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"search_space.{key}: unknown type '{kind}'; valid: {', '.join(DISTRIBUTIONS)}")
        if extra:
            raise ConfigError(f"search_space.{key}: unknown fields {sorted(extra)}")
        if kind == "choice":
            values = d.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"search_space.{key}: choice needs a non-empty 'values' list")
            p = Param(key, kind, values=values)
            samples = values
        else:
            try:
                low, high = float(d["low"]), float(d["high"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"search_space.{key}: {kind} needs numeric 'low' and 'high'") from None
            if not low < high:
                raise ConfigError(f"search_space.{key}: low ({low}) must be < high ({high})")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"search_space.{key}: loguniform needs low > 0")
            p = Param(key, kind, low, high)
            samples = [int(low), int(high)] if kind == "int" else [low, high]
        for value in samples:  # the key must exist and accept the sampled values
            trial = copy.deepcopy(tree)
            try:
                set_dotted(trial, key, value)
                build_config(base.task, spec, trial)
            except ConfigError as exc:
                raise ConfigError(f"search_space.{key}: {exc}") from exc
        params.append(p)
    return params


def load_tune_config(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[TuneConfig, ExperimentConfig, list[Param]]:
    """Read and validate a tune config; ``overrides`` ``a.b=c`` apply to the tune config itself
    (``num_samples=2``, ``scheduler.grace_period=2``, ``storage=...``; its dataclass defaults are
    the starting point, so a section the file leaves out can be overridden) or, under ``base.``,
    to the training config."""
    from montage.core.paths import resolve_config_path

    path = Path(path)
    own: list[str] = []
    base_over: list[str] = []
    for text in overrides or []:
        key, _ = parse_override(text)
        if key.startswith("base."):
            base_over.append(text[len("base.") :])
        else:
            own.append(text)
    tcfg: TuneConfig = load_file(TuneConfig, path, own)
    base_path = path.parent / tcfg.base if (path.parent / tcfg.base).is_file() else resolve_config_path(tcfg.base)
    task_cls = TASKS.get(tcfg.task)
    base = load_config(tcfg.task, task_cls.spec, base_path, tcfg.overrides + base_over)
    tcfg.metric = tcfg.metric or sweep_metric(base, task_cls.monitor[0])
    tcfg.mode = tcfg.mode or task_cls.monitor[1]
    _check_metric(tcfg.metric, base)
    r = tcfg.resources
    base.scaling.workers, base.scaling.gpus = r.workers, r.gpus
    base.scaling.cpus_per_worker, base.scaling.gpus_per_worker = r.cpus_per_worker, r.gpus_per_worker
    base.run.storage_endpoint = tcfg.storage_endpoint or base.run.storage_endpoint
    s = tcfg.scheduler
    if s.name == "asha" and s.grace_period > (s.max_t or base.train.epochs):
        raise ConfigError(
            f"scheduler.grace_period ({s.grace_period}) must be <= max_t ({s.max_t or base.train.epochs}: "
            "train.epochs unless scheduler.max_t is set)"
        )
    params = parse_space(tcfg.search_space, base)
    for point in tcfg.points_to_evaluate:
        unknown = set(point) - {p.key for p in params}
        if unknown:
            raise ConfigError(f"points_to_evaluate: {sorted(unknown)} not in the search space")
    return tcfg, base, params


def sweep_metric(base: ExperimentConfig, monitored: str) -> str:
    """The metric a sweep optimises by default: the task's monitored one, or with ``cv.folds`` in the base
    its cross-validated mean (``val/iou`` → ``cv/iou_mean``, see :mod:`montage.launch.tune_cv`)."""
    return f"cv/{monitored.removeprefix('val/')}_mean" if base.cv.folds else monitored


def _check_metric(metric: str, base: ExperimentConfig) -> None:
    if base.cv.folds and not metric.startswith("cv/"):
        suggestion = f"cv/{metric.removeprefix('val/')}_mean" if metric.startswith("val/") else "cv/<metric>_mean"
        raise ConfigError(
            f"metric: {metric}: with cv.folds={base.cv.folds} in the base each trial reports its folds' mean and std "
            f"per epoch, cv/<metric>_mean and cv/<metric>_std: set metric: {suggestion} (or leave metric out)"
        )
    if metric.startswith("cv/") and not base.cv.folds:
        raise ConfigError(
            f"metric: {metric} is a cross-validated metric: set cv.folds=K (>= 2) in the base "
            "(overrides: [cv.folds=K], or base.cv.folds=K on the command line)"
        )
