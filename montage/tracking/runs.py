"""MLflow tracking: one run per training (a child of the sweep's parent run under Tune).

The run's lifecycle here (the tracking URI, create / find / open a run, mark it failed) and the
checkpoint logged as an MLflow pyfunc model (checkpoint as an artifact, loaded back with
``weights_only=True``). What a training logs while it runs (only the reporting rank: the flattened
resolved config as params, per-epoch metrics, sample grids) is the loop's hook,
:class:`montage.tracking.run_hook.MlflowHook`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from montage.core import schema
from montage.core.config import ConfigError, ExperimentConfig, flatten, to_dict
from montage.core.sources import logged_model_uri

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlruns.db"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def resolve_tracking_uri(uri: str = "") -> str:
    """Config value → $MLFLOW_TRACKING_URI → ``sqlite:///mlruns.db``; local paths made absolute
    so Ray workers in other working directories write to the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri:  # a plain folder: file store
        uri = Path(uri).resolve().as_uri()
    return uri


def client(uri: str = "") -> Any:
    """An MLflow client bound to ``uri`` (resolved as above)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:"))


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def get_experiment_id(client: Any, name: str, artifacts: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifacts).resolve().as_uri() if is_local_store(uri) and artifacts else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another trial
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def prepare_tracking(cfg: ExperimentConfig) -> None:
    """Driver side: resolve the URI and artifact root in place, before workers start."""
    cfg.tracking.uri = resolve_tracking_uri(cfg.tracking.uri)
    if cfg.tracking.artifacts and "://" not in cfg.tracking.artifacts:
        cfg.tracking.artifacts = str(Path(cfg.tracking.artifacts).resolve())
    if not cfg.tracking.experiment:
        cfg.tracking.experiment = f"montage-{cfg.task}"


class TrackingUnavailable(ConfigError):
    """The tracking server does not answer and ``tracking.required`` is on."""


def tracking_down(cfg: ExperimentConfig) -> str | None:
    """Why the tracking server does not answer its health check (``tracking.timeout_s``), or None when it
    does (a local store always does)."""
    import requests

    uri = resolve_tracking_uri(cfg.tracking.uri)
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=cfg.tracking.timeout_s).raise_for_status()
        return None
    except requests.RequestException as exc:
        return str(exc).splitlines()[0][:300]


def tracking_answers(cfg: ExperimentConfig) -> bool:
    """Driver side, before any worker starts: whether the tracking server answers (a local store
    always does). One that does not fails here at once when ``tracking.required`` (the default: a
    run nobody can see is rarely what was meant), else a warning and False — the workers train and
    send their records when it is back."""
    uri = resolve_tracking_uri(cfg.tracking.uri)
    reason = tracking_down(cfg)
    if reason is None:
        return True
    if cfg.tracking.required:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} does not answer ({reason}). Start it (on a cluster: `mlflow server` "
            "on the head, as cluster.yaml does)"
            "; or pass tracking.required=false to train now and log to it once it is back"
        )
    log.warning("MLflow tracking server %s does not answer (%s): training anyway (tracking.required=false); "
                "its records wait in the run folder until the server is back", uri, reason)  # fmt: skip
    return False


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def run_client(cfg: ExperimentConfig) -> Any:
    """An MLflow client with this config's request timeout and retries. MLflow's defaults (7 retries,
    120 s timeout) block one call ~4 min against a refused port and far longer against a silent one;
    montage's own outbox and backoff take over after ``tracking.retries`` quick retries."""
    import mlflow

    t = cfg.tracking
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(t.timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(t.retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"

    return mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri))


def create_run(cfg: ExperimentConfig, tags: dict[str, str] | None = None) -> str:
    """A new MLflow run for ``cfg``: tags, the flattened config as params, the config file."""
    from mlflow.entities import Param

    from montage.core.config import save_config

    t = cfg.tracking
    client = run_client(cfg)
    uri = resolve_tracking_uri(t.uri)
    exp_id = get_experiment_id(client, t.experiment or f"montage-{cfg.task}", t.artifacts, uri)
    all_tags = {schema.TASK: cfg.task, "mlflow.source.git.commit": git_commit(), **(tags or {})}
    if t.parent_run_id:
        all_tags["mlflow.parentRunId"] = t.parent_run_id
    run_id = client.create_run(
        exp_id, run_name=cfg.run.name or None, tags={k: v for k, v in all_tags.items() if v}
    ).info.run_id
    params = [Param(k, _param_value(v)) for k, v in flatten(to_dict(cfg)).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)
        client.log_artifact(run_id, str(path))
    log.info("MLflow run %s in experiment '%s' (%s)", run_id, t.experiment, uri)
    return run_id


def find_run(cfg: ExperimentConfig, run_dir: str) -> str | None:
    """The run that logs the training in ``run_dir`` (under the sweep's parent when there is one)."""
    client = run_client(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment or f"montage-{cfg.task}")
    if exp is None:
        return None
    query = f"tags.`{schema.RUN_DIR}` = '{run_dir}'"
    if cfg.tracking.parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{cfg.tracking.parent_run_id}'"
    found = client.search_runs([exp.experiment_id], query, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def run_dir_of(cfg: ExperimentConfig) -> str:
    """The run folder ``<run.storage>/<run.name>`` as the launchers name it (:data:`RUN_DIR_TAG`)."""
    return f"{cfg.run.storage.rstrip('/')}/{cfg.run.name}"


def open_run(cfg: ExperimentConfig, run_dir: str, tags: dict[str, str] | None = None, resume: bool = False) -> str:
    """Driver side, before the workers start: the run a training logs into. A resumed training
    (``resume``, or a restored Tune trial under the same parent) finds its run again; otherwise a
    new run is created. Workers attach to it, so a restart after a failure keeps one run."""
    if cfg.tracking.run_id:
        return cfg.tracking.run_id
    found = find_run(cfg, run_dir) if resume or cfg.tracking.parent_run_id else None
    return found or create_run(cfg, {schema.RUN_DIR: run_dir, **(tags or {})})


def starts(cfg: ExperimentConfig, run_id: str) -> int:
    """How many times training started in ``run_id`` (see :data:`schema.STARTS`)."""
    return int(run_client(cfg).get_run(run_id).data.tags.get(schema.STARTS, "0") or 0)


def end_failed_run(cfg: ExperimentConfig, run_id: str, error: BaseException | str) -> None:
    """Driver side, after a failed fit: its workers may have been killed before they could say
    so. Mark the run FAILED (KILLED for an interrupt) with the error as a tag."""
    mark_failed(run_client(cfg), run_id, error)


def mark_failed(client: Any, run_id: str, error: BaseException | str) -> None:
    """End ``run_id`` FAILED (KILLED for an interrupt) with the error as a tag: the driver's
    :func:`end_failed_run` and the worker's hook (``MlflowHook.on_error``) both end a run this way."""
    interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
    client.set_tag(run_id, schema.ERROR, repr(error)[:4000])
    client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")


@dataclass(frozen=True)
class LoggedCheckpoint:
    """A checkpoint logged as an MLflow model (and, when asked, registered as a version)."""

    model_id: str
    model_uri: str  # models:/<model_id>
    registered_model_version: str | None = None


def log_checkpoint_model(
    uri: str, run_id: str, checkpoint: Path, task: str, metrics: dict[str, Any], registered_name: str | None = None
) -> LoggedCheckpoint:
    """Log ``checkpoint`` as a pyfunc model of run ``run_id`` (models-from-code: nothing pickled)
    and register it as a new version of ``registered_name`` when given. Client calls only: the
    process-wide tracking URI and active run are left alone."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    run = client.get_run(run_id)
    tags = {schema.TASK: task, **{schema.logged_metric(k): str(v) for k, v in metrics.items()}}
    model = client.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id, tags=tags, model_type="pyfunc"
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(PYFUNC_CODE),
                artifacts={"checkpoint": str(checkpoint)},
                pip_requirements=["montage"],
            )
            if registered_name:  # a registered version carries the statistics Serve's drift detection compares with
                from montage.tracking.drift import write_reference

                write_reference(local, checkpoint, task)
            client.log_model_artifacts(model.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    step = int(run.data.metrics.get("epoch", 0) or 0)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    version = None
    if registered_name:
        try:
            client.create_registered_model(registered_name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "ALREADY_EXISTS" not in str(exc.error_code):
                raise
        digest = run.data.tags.get(schema.DATA_DIGEST)  # the data it was trained on (the run's log_input)
        mv = client.create_model_version(
            registered_name,
            source=model.artifact_location,
            run_id=run_id,
            model_id=model.model_id,
            tags={schema.DATA_DIGEST: digest} if digest else None,
        )
        version = str(mv.version)
    return LoggedCheckpoint(
        model_id=model.model_id, model_uri=logged_model_uri(model.model_id), registered_model_version=version
    )
