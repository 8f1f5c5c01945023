"""The model registry: the one place that names montage's models, registers checkpoints as
versions, resolves ``models:/<name>@<alias>`` and ``models:/<name>/<version>``, moves the
``champion`` alias and compares a candidate with the champion.

Serve, Tune, the demo and ``montage models`` all go through it. It uses ``MlflowClient``
objects bound to a tracking URI; it never sets MLflow's process-wide tracking URI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from montage.core import schema
from montage.core.config import ExperimentConfig
from montage.core.sources import CHALLENGER, CHAMPION, EXPORTED, ModelSource, model_name  # noqa: F401  (re-exported)
from montage.tracking.runs import client, log_checkpoint_model, resolve_tracking_uri  # noqa: F401  (client re-exported)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """A checkpoint registered as a model version."""

    name: str
    version: str
    promoted: bool  # the champion alias moved to it
    metric: str
    value: float


def resolve_version(source: ModelSource, uri: str = "") -> str:
    """The version number a registry source names now (an alias is looked up)."""
    if source.kind == "version":
        return source.version
    if source.kind != "alias":
        raise ValueError(f"{source} is not a registry source: it has no version")
    return str(client(uri).get_model_version_by_alias(source.name, source.alias).version)


def register_checkpoint(
    base: ExperimentConfig,
    checkpoint: str,
    run_id: str,
    metric: str,
    mode: str,
    value: float,
    sweep: str,
    params: dict[str, Any],
    promote: str = "better",
    extra_tags: dict[str, str] | None = None,
) -> Registration:
    """Register ``checkpoint`` as a new version of ``montage-<task>``; move ``@champion`` to it
    when ``promote`` is ``always``, or ``better`` and it beats the champion on ``metric``.
    ``extra_tags`` go on the version beside the metric, value, sweep and params."""
    name = model_name(base.task)
    from montage.tracking.sources import local_checkpoint

    path = local_checkpoint(checkpoint)
    info = log_checkpoint_model(base.tracking.uri, run_id, path, base.task, {metric: value}, registered_name=name)
    version = str(info.registered_model_version)
    mlc = client(base.tracking.uri)
    tags = {
        schema.METRIC: metric,
        schema.MODE: mode,
        schema.VALUE: repr(float(value)),
        schema.SWEEP: sweep,
        schema.SWEEP_PARAMS: yaml.safe_dump(params, default_flow_style=True).strip(),
        **(extra_tags or {}),
    }
    for k, v in tags.items():
        mlc.set_model_version_tag(name, version, k, v)
    current = champion(base.task, base.tracking.uri)
    promoted = False
    if promote == "always" or (promote == "better" and beats(value, mode, metric, current)):
        mlc.set_registered_model_alias(name, CHAMPION, version)
        promoted = True
    log.info(
        "registered %s version %s (%s=%.5g)%s", name, version, metric, value, f"; now @{CHAMPION}" if promoted else ""
    )
    return Registration(name=name, version=version, promoted=promoted, metric=metric, value=float(value))


def beats(value: float, mode: str, metric: str, current: Any) -> bool:
    """Whether ``value`` of ``metric`` beats the champion version ``current`` (None: no champion)."""
    if current is None:
        return True
    if current.tags.get(schema.METRIC) != metric:
        return True  # a champion judged on another metric cannot be compared: the sweep's rules win
    old = float(current.tags.get(schema.VALUE, "nan"))
    if old != old:  # NaN
        return True
    return value > old if mode == "max" else value < old


def champion(task: str, uri: str = "") -> Any:
    """The champion ModelVersion of a task, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_model_version_by_alias(model_name(task), CHAMPION)
    except MlflowException:
        return None


def list_versions(task: str, uri: str = "") -> list[Any]:
    return sorted(client(uri).search_model_versions(f"name = '{model_name(task)}'"), key=lambda v: int(v.version))


def promote(task: str, version: str, uri: str = "") -> None:
    client(uri).set_registered_model_alias(model_name(task), CHAMPION, str(version))


def resolve_model_sources(cfg: ExperimentConfig) -> None:
    """``distill.teacher`` and ``init.checkpoint`` given as a registry or remote source → the downloaded
    checkpoints (in place)."""
    for section, key in (("distill", "teacher"), ("init", "checkpoint")):
        text = getattr(getattr(cfg, section), key)
        if not text:
            continue
        source = ModelSource.parse(text, f"{section}.{key}")
        if source.kind in EXPORTED:
            raise ValueError(
                f"{section}.{key} {source}: an exported network ({source.kind}) has no weights to train from; "
                "give a checkpoint"
            )
        if not source.local:
            setattr(getattr(cfg, section), key, str(download_model_checkpoint(source, cfg.tracking.uri)))


def download_model_checkpoint(source: ModelSource | str, tracking_uri: str = "") -> Path:
    """The local checkpoint file of a registry (or remote) source: the version's artifacts are fetched
    from where they are stored, with a client bound to ``tracking_uri``."""
    from montage.tracking.sources import resolve_source

    resolved = resolve_source(source, tracking_uri)
    if resolved.exported is not None:
        raise ValueError(f"{source} is an exported variant: its checkpoint is its parent's; give that instead")
    return resolved.checkpoint


def _alias_version(mlc: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlc.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _registered_name(source: ModelSource) -> str:
    if not source.in_registry:
        raise ValueError(f"{source} is not a registry version: nothing to move in the registry")
    return source.name


def promote_challenger(source: ModelSource, version: str, uri: str = "", reason: str = "") -> str | None:
    """A rollout's challenger wins: ``@champion`` of the source's model moves to ``version``, the
    ``@challenger`` alias (when it still names that version) is removed, and both versions are tagged.
    Returns the version that was champion before (None if there was none)."""
    name = _registered_name(source)
    mlc = client(uri)
    before = _alias_version(mlc, name, CHAMPION)
    mlc.set_registered_model_alias(name, CHAMPION, str(version))
    if _alias_version(mlc, name, CHALLENGER) == str(version):
        mlc.delete_registered_model_alias(name, CHALLENGER)
    mlc.set_model_version_tag(name, str(version), schema.ROLLOUT, "promoted")
    if reason:
        mlc.set_model_version_tag(name, str(version), schema.ROLLOUT_REASON, reason[:5000])
    if before and before != str(version):
        mlc.set_model_version_tag(name, before, schema.ROLLOUT, "replaced")
    log.info("%s: version %s is now @%s (was %s)", name, version, CHAMPION, before)
    return before


def retire_challenger(source: ModelSource, version: str, uri: str = "", reason: str = "") -> None:
    """A rollout's challenger loses: the ``@challenger`` alias (when it still names ``version``) is
    removed and the version tagged ``montage.rollout=rolled-back``; ``@champion`` stays."""
    name = _registered_name(source)
    mlc = client(uri)
    if _alias_version(mlc, name, CHALLENGER) == str(version):
        mlc.delete_registered_model_alias(name, CHALLENGER)
    mlc.set_model_version_tag(name, str(version), schema.ROLLOUT, "rolled-back")
    if reason:
        mlc.set_model_version_tag(name, str(version), schema.ROLLOUT_REASON, reason[:5000])
    log.info("%s: version %s rolled back (no longer @%s)", name, version, CHALLENGER)
