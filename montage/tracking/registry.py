"""The model registry: the one place that names montage's models, registers checkpoints as
versions, resolves ``models:/<name>@<alias>`` and ``models:/<name>/<version>``, moves the
``champion`` alias and compares a candidate with the champion.

Serve, Tune, the demo and ``montage models`` all go through it. It uses ``MlflowClient``
objects bound to a tracking URI; it never sets MLflow's process-wide tracking URI.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from montage.core.config import ExperimentConfig
from montage.tracking.runs import log_checkpoint_model, resolve_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"


@dataclass(frozen=True)
class Registration:
    """A checkpoint registered as a model version."""

    name: str
    version: str
    promoted: bool  # the champion alias moved to it
    metric: str
    value: float


def model_name(task: str) -> str:
    """The registered-model name of a task: ``montage-<task>``."""
    return f"montage-{task}"


def client(uri: str = "") -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def parse_model_uri(source: str) -> tuple[str, str, str]:
    """``models:/<name>@<alias>`` → (name, alias, ""); ``models:/<name>/<version>`` → (name, "", version)."""
    if not source.startswith("models:/"):
        raise ValueError(f"not a model URI: {source!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    ref = source[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, ""
    name, _, version = ref.partition("/")
    if not name or not version:
        raise ValueError(f"model URI {source!r} names no alias or version")
    return name, "", version


def resolve_version(source: str, uri: str = "") -> str:
    """The version number a model URI points at now (an alias is looked up)."""
    name, alias, version = parse_model_uri(source)
    return str(client(uri).get_model_version_by_alias(name, alias).version) if alias else version


def _local_checkpoint(checkpoint: str) -> Path:
    """A checkpoint folder/file on this machine (remote checkpoints are downloaded)."""
    from montage.platform.checkpoint import resolve_checkpoint_path

    if "://" not in checkpoint:
        return resolve_checkpoint_path(checkpoint)
    import pyarrow.fs  # what Ray Train persists checkpoints with (s3://, gs://, ...)

    local = tempfile.mkdtemp(prefix="montage-download-")
    pyarrow.fs.copy_files(checkpoint, local)
    return resolve_checkpoint_path(local)


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
    path = _local_checkpoint(checkpoint)
    info = log_checkpoint_model(base.tracking.uri, run_id, path, base.task, {metric: value}, registered_name=name)
    version = str(info.registered_model_version)
    mlc = client(base.tracking.uri)
    tags = {
        "montage.metric": metric,
        "montage.mode": mode,
        "montage.value": repr(float(value)),
        "montage.sweep": sweep,
        "montage.params": yaml.safe_dump(params, default_flow_style=True).strip(),
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
    if current.tags.get("montage.metric") != metric:
        return True  # a champion judged on another metric cannot be compared: the sweep's rules win
    old = float(current.tags.get("montage.value", "nan"))
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
    """``distill.teacher`` and ``init.checkpoint`` given as ``models:/…`` → the downloaded
    checkpoints (in place)."""
    if cfg.distill.teacher.startswith("models:/"):
        cfg.distill.teacher = str(download_model_checkpoint(cfg.distill.teacher, cfg.tracking.uri))
    if cfg.init.checkpoint.startswith("models:/"):
        cfg.init.checkpoint = str(download_model_checkpoint(cfg.init.checkpoint, cfg.tracking.uri))


def download_model_checkpoint(uri_or_task: str, tracking_uri: str = "") -> Path:
    """``models:/<name>@<alias>``, ``models:/<name>/<version>`` (or a bare task name, meaning
    its champion) → the local checkpoint file. The version is looked up with a client bound to
    ``tracking_uri`` and its artifacts fetched from where they are stored."""
    import mlflow

    from montage.platform.checkpoint import resolve_checkpoint_path

    model_uri = uri_or_task if uri_or_task.startswith("models:/") else f"models:/{model_name(uri_or_task)}@{CHAMPION}"
    name, alias, version = parse_model_uri(model_uri)
    mlc = client(tracking_uri)
    mv = mlc.get_model_version_by_alias(name, alias) if alias else mlc.get_model_version(name, version)
    source = mv.source
    if source.startswith("models:/") and mv.model_id:  # registered from a logged model by id
        source = mlc.get_logged_model(mv.model_id).artifact_location
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=resolve_tracking_uri(tracking_uri))
    )
    hits = list(local.rglob("*.pt"))
    if not hits:
        raise FileNotFoundError(f"{model_uri} (version {mv.version}) holds no checkpoint artifact")
    return resolve_checkpoint_path(hits[0])


CHALLENGER = "challenger"
ROLLOUT_TAG = "montage.rollout"  # promoted | rolled-back | replaced: what a rollout did to a version


def _alias_version(mlc: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlc.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote_challenger(source: str, version: str, uri: str = "", reason: str = "") -> str | None:
    """A rollout's challenger wins: ``@champion`` of the source's model moves to ``version``, the
    ``@challenger`` alias (when it still names that version) is removed, and both versions are tagged.
    Returns the version that was champion before (None if there was none)."""
    name, _, _ = parse_model_uri(source)
    mlc = client(uri)
    before = _alias_version(mlc, name, CHAMPION)
    mlc.set_registered_model_alias(name, CHAMPION, str(version))
    if _alias_version(mlc, name, CHALLENGER) == str(version):
        mlc.delete_registered_model_alias(name, CHALLENGER)
    mlc.set_model_version_tag(name, str(version), ROLLOUT_TAG, "promoted")
    if reason:
        mlc.set_model_version_tag(name, str(version), f"{ROLLOUT_TAG}.reason", reason[:5000])
    if before and before != str(version):
        mlc.set_model_version_tag(name, before, ROLLOUT_TAG, "replaced")
    log.info("%s: version %s is now @%s (was %s)", name, version, CHAMPION, before)
    return before


def retire_challenger(source: str, version: str, uri: str = "", reason: str = "") -> None:
    """A rollout's challenger loses: the ``@challenger`` alias (when it still names ``version``) is
    removed and the version tagged ``montage.rollout=rolled-back``; ``@champion`` stays."""
    name, _, _ = parse_model_uri(source)
    mlc = client(uri)
    if _alias_version(mlc, name, CHALLENGER) == str(version):
        mlc.delete_registered_model_alias(name, CHALLENGER)
    mlc.set_model_version_tag(name, str(version), ROLLOUT_TAG, "rolled-back")
    if reason:
        mlc.set_model_version_tag(name, str(version), f"{ROLLOUT_TAG}.reason", reason[:5000])
    log.info("%s: version %s rolled back (no longer @%s)", name, version, CHALLENGER)
