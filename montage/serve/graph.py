"""The model deployments of the application: each model's champion and challenger arms, their
sources pinned to a revision, bounded queues and autoscaling; and the check after a (re)deploy
that every model loaded what it was given (else it kept serving its previous version)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from montage.core.config import to_dict
from montage.core.serve_sections import ModelServeConfig, MonitoringConfig, ServeConfig
from montage.core.sources import ModelSource
from montage.serve.deployments import Harmonizer, LocalModel, Pix2Pix, Segmenter

log = logging.getLogger("montage.serve")

CLASSES = {"segmentation": Segmenter, "harmonization": Harmonizer, "pix2pix": Pix2Pix}
_CODE: list[str] = []


def pinned(deployment: Any, version: str) -> Any:
    """``deployment`` with a fixed Serve version. Ray 2.60 refuses ``options(version=...)`` but still
    deploys a deployment's ``_version`` (``ray/serve/_private/client.py``) and keeps it through
    ``options``/``bind``; without one every ``serve.run`` draws a random version."""
    deployment._version = version
    return deployment


def code_version(*extra: Any) -> str:
    """The Serve ``version`` of a deployment: a hash of montage's sources (and ``extra``, e.g. the
    ingress's arguments). Without one Serve draws a random version at every ``serve.run``, so every
    reload restarted every replica (and a replica that failed to load had nothing to keep serving);
    with it a reload that changes only ``user_config`` reconfigures the running replicas in place."""
    import hashlib

    if not _CODE:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parents[1]
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        _CODE.append(h.hexdigest()[:16])
    if not extra:
        return _CODE[0]
    return hashlib.sha256(repr((_CODE[0], *extra)).encode()).hexdigest()[:16]


class ReloadError(RuntimeError):
    """A (re)deploy left a model on its previous version because the new one failed to load."""


@dataclass(frozen=True)
class Arm:
    """What one arm of a model serves: its source, the revision that pins it (a registry alias's version
    now, a local file's modification time) and the runtime that runs it."""

    source: ModelSource
    revision: str
    runtime: str


def _model(
    cls: Any,
    cfg: ModelServeConfig,
    task: str,
    tracking_uri: str,
    monitoring: MonitoringConfig | None = None,
    retry_after_s: float = 1.0,
    fused: bool = False,
    arm: str = "champion",
) -> Any:
    """The bound deployment of a model's arm, or (``fused``) what the ingress needs to run it itself;
    None when the model is off, or the challenger is unset (or a registry alias that names no version)."""
    if not cfg.enabled:
        return None
    served = arm_of(cfg, task, tracking_uri, arm)
    if served is None:
        return None
    user_config = {
        "source": served.source.uri,
        "runtime": served.runtime,
        "revision": served.revision,
        "arm": arm,
        "tracking_uri": tracking_uri,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "threads": cfg.threads,
        "monitoring": to_dict(monitoring or MonitoringConfig()),
    }
    if fused:
        return LocalModel.spec(cls, user_config)
    return pinned(
        cls.options(
            name=cls.name if arm == "champion" else f"{cls.name}Challenger",
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
            **replica_options(cfg),
            **_overload(task, cfg.max_ongoing_requests, cfg.max_queued_requests, retry_after_s),
            user_config=user_config,
        ),
        code_version(),
    ).bind()


def replica_options(cfg: ModelServeConfig) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` when the section's autoscaling is on, else a fixed ``num_replicas``."""
    return cfg.autoscaling.options() if cfg.autoscaling.enabled else {"num_replicas": cfg.num_replicas}


def arm_of(cfg: ModelServeConfig, task: str, tracking_uri: str, arm: str) -> Arm | None:
    """The :class:`Arm` of ``arm`` (champion | challenger); None for an unset challenger or a challenger
    alias that names no version. The runtime is the section's (``runtime``, ``challenger_runtime``) when
    set, else the source's own: ``onnx`` for an ONNX file or a registry version tagged as an ONNX
    variant, ``openvino`` for an IR file or a version tagged as an OpenVINO variant, ``torch``
    otherwise. A registry version the registry does not hold raises :class:`ReloadError` (nothing is
    deployed)."""
    from mlflow.exceptions import MlflowException

    from montage.tracking.sources import model_version, source_runtime

    source = cfg.arm_source(task, arm)
    if source is None:
        return None
    runtime = cfg.runtime if arm == "champion" else cfg.challenger_runtime
    if source.in_registry:
        try:
            version = model_version(source, tracking_uri)
        except MlflowException as exc:
            if arm == "challenger" and source.kind == "alias":
                log.info("%s: no challenger (%s names no version: %s)", task, source, exc.message)
                return None
            raise ReloadError(f"{task} ({arm}): {source}: {exc.message}") from exc
        return Arm(source, str(version.version), runtime or source_runtime(source, version=version))
    path = Path(source.path)
    revision = str(path.stat().st_mtime_ns) if source.local and path.exists() else ""
    return Arm(source, revision, runtime or source_runtime(source))


def model_graph(cfg: ServeConfig, uri: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(champion per task, challenger per task, the ingress's rollout settings per task)."""
    bound, challengers, rollout = {}, {}, {}
    for task, cls in CLASSES.items():
        mcfg: ModelServeConfig = getattr(cfg, task)
        args = (cls, mcfg, task, uri, cfg.monitoring, cfg.retry_after_s, cfg.fused)
        bound[task] = _model(*args)
        chall = _model(*args, arm="challenger") if bound[task] is not None else None
        if chall is not None:
            challengers[task] = chall
            served = arm_of(mcfg, task, uri, "challenger")
            rollout[task] = {
                "config": to_dict(mcfg.rollout),
                "salt": f"{served.source}@{served.revision}",
                "source": served.source.uri,
                "version": served.revision,
                "tracking_uri": uri,
            }
    return bound, challengers, rollout


def _overload(what: str, max_ongoing: int, max_queued: int, retry_after_s: float) -> dict[str, Any]:
    """Bounded queues: past ``max_queued`` waiting requests a caller gets 503 with Retry-After at once."""
    if max_ongoing < 1:
        raise ValueError(f"{what}: max_ongoing_requests must be >= 1, got {max_ongoing}")
    if max_queued < 1 and max_queued != -1:
        raise ValueError(f"{what}: max_queued_requests must be >= 1 or -1 (unbounded), got {max_queued}")
    if retry_after_s < 0:
        raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
    return {
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max_queued,
        "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
    }


def check_reload(cfg: ServeConfig) -> None:
    """Raise :class:`ReloadError` when a model deployment kept its previous version because the
    configured one failed to load (its replicas say so; ``/healthz`` too)."""
    if cfg.fused:
        return
    failed = []
    for task, name in (("segmentation", "Segmenter"), ("harmonization", "Harmonizer"), ("pix2pix", "Pix2Pix")):
        mcfg: ModelServeConfig = getattr(cfg, task)
        if not mcfg.enabled:
            continue
        for deployment in (name, f"{name}Challenger") if mcfg.challenger else (name,):
            try:
                st = serve.get_deployment_handle(deployment, cfg.name).status.remote().result(timeout_s=120)
            except Exception as exc:  # noqa: BLE001 - e.g. a challenger alias that names no version: not deployed
                log.debug("no status from %s: %r", deployment, exc)
                continue
            if st["reload_error"]:
                e = st["reload_error"]
                failed.append(f"{deployment}: {e['source']} failed to load ({e['error']}); still serving {st['label']}")
    if failed:
        raise ReloadError("reload failed, the previous versions keep serving:\n  " + "\n  ".join(failed))


def _check_sources(cfg: ServeConfig) -> None:
    from montage.serve.deployments import load_model
    from montage.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri)
    for task in ("segmentation", "harmonization", "pix2pix"):
        mcfg: ModelServeConfig = getattr(cfg, task)
        for arm in ("champion", "challenger") if mcfg.challenger else ("champion",):
            if not mcfg.enabled:
                continue
            served = arm_of(mcfg, task, uri, arm)
            if served is None:
                continue
            try:
                load_model(task, {"source": served.source.uri, "runtime": served.runtime, "tracking_uri": uri})
            except Exception as exc:
                raise ReloadError(f"{task} ({arm}): {served.source} does not load, nothing deployed: {exc!r}") from exc
