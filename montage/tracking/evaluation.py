"""An evaluation (``montage evaluate``) as an MLflow run linked to the model it scored.

The run lives in the task's experiment, tagged ``montage.kind=evaluation`` and with the model
source (and, for a registered model, its name and version; the version gets the run's id as
``montage.evaluation_run``). It logs the model's metrics, each baseline's as
``baseline/<name>/<metric>``, the data it was scored on with ``log_inputs`` (context
``evaluation``), the per-image table (``log_table``), the worst cases image and the report folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from montage.core import schema
from montage.core.config import ExperimentConfig
from montage.core.sources import ModelSource
from montage.platform.evaluation import Evaluation
from montage.tracking.datasets import log_data_input
from montage.tracking.runs import get_experiment_id, resolve_tracking_uri

log = logging.getLogger(__name__)


def log_evaluation(
    cfg: ExperimentConfig, ev: Evaluation, report_dir: str | Path, source: ModelSource, tracking_uri: str = ""
) -> str:
    """Log ``ev`` as a finished MLflow run; returns its id."""
    import mlflow
    from mlflow.entities import Metric

    uri = resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = get_experiment_id(client, cfg.tracking.experiment or f"montage-{cfg.task}", cfg.tracking.artifacts, uri)
    tags = {schema.KIND: "evaluation", schema.TASK: cfg.task, schema.SOURCE: source.uri}
    version = None
    if source.in_registry:
        from montage.tracking.registry import resolve_version

        version = resolve_version(source, tracking_uri)
        tags |= {schema.MODEL_NAME: source.name, schema.MODEL_VERSION: version}
    run = client.create_run(exp, run_name=f"evaluate-{cfg.task}", tags=tags)
    rid = run.info.run_id
    try:
        now = int(time.time() * 1000)
        values = dict(ev.metrics)
        for b, ms in ev.baselines.items():
            values |= {f"baseline/{b}/{k.split('/', 1)[-1]}": v for k, v in ms.items()}
        client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
        log_data_input(client, rid, cfg, {"val": len(ev.per_image)}, context="evaluation")
        if ev.per_image:
            keys = list(dict.fromkeys(k for r in ev.per_image for k in r))
            client.log_table(
                rid, data={k: [r.get(k) for r in ev.per_image] for k in keys}, artifact_file="per_image.json"
            )
        client.log_artifacts(rid, str(report_dir), artifact_path="report")
        if version is not None:
            client.set_model_version_tag(tags[schema.MODEL_NAME], version, schema.EVALUATION_RUN, rid)
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    return rid
