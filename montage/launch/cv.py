"""K-fold cross-validation (``cv.folds=K`` on any training config).

K fits of one config, fold ``k`` validating on the k-th of K seeded, disjoint parts of the
training samples (:func:`~montage.platform.sampling.kfold_split`) and training on the rest: as
parallel Ray Train fits (one ``TorchTrainer`` per fold, started from threads of this driver; a
fold that does not fit the cluster yet waits for resources like any fit) or one after the other
in this process. One MLflow parent run holds the folds as child runs and the mean ± std over the
folds of every validation metric at each fold's best epoch (``cv/<metric>_mean``, ``_std``).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from montage.core import schema
from montage.core.config import ExperimentConfig
from montage.platform.runner import RunSummary, default_run_name

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    name: str
    folds: list[RunSummary]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    parent_run_id: str | None = None

    @property
    def error(self) -> str | None:
        errors = [f"fold {k}: {s.error}" for k, s in enumerate(self.folds) if s.error]
        return "; ".join(errors) or None

    def table(self) -> str:
        lines = [f"cross-validation {self.name}: {len(self.folds)} folds (MLflow parent run {self.parent_run_id})"]
        for key in sorted(self.mean):
            lines.append(f"  {key:28s} {self.mean[key]:.4g} ± {self.std[key]:.2g}")
        return "\n".join(lines)


def cv_key(metric: str, stat: str) -> str:
    """The cross-validated name of a validation metric: ``val/iou`` → ``cv/iou_mean`` (``stat``: mean | std)."""
    return f"cv/{metric.removeprefix('val/')}_{stat}"


def fold_configs(
    cfg: ExperimentConfig, name: str, parent_run_id: str = "", storage: str | None = None
) -> list[ExperimentConfig]:
    """One config per fold: ``cv.fold=k``, run ``<name>-fold<k>`` beside the others (or ``fold<k>`` in the
    folder ``storage``: a sweep trial's folds live in the trial's folder), a child of ``parent_run_id``."""
    out = []
    for k in range(cfg.cv.folds):
        c = copy.deepcopy(cfg)
        c.cv.fold = k
        c.run.name = f"fold{k}" if storage else f"{name}-fold{k}"
        c.run.storage = storage or c.run.storage
        c.tracking.parent_run_id = parent_run_id
        c.tracking.run_id = ""
        out.append(c)
    return out


def aggregate(summaries: list[RunSummary]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (sample) std over the folds of every ``val/`` metric at each fold's best epoch."""
    return mean_std(
        [{k: v for k, v in s.best_metrics.items() if k.startswith("val/")} for s in summaries if not s.error]
    )


def mean_std(per_fold: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (sample) std over the folds of every metric all of them have."""
    keys = sorted(set.intersection(*(set(m) for m in per_fold))) if per_fold else []
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k in keys}
    std = {k: float(np.std([m[k] for m in per_fold], ddof=1)) if len(per_fold) > 1 else 0.0 for k in keys}
    return mean, std


def run_cv(
    cfg: ExperimentConfig,
    use_ray: bool = True,
    address: str | None = None,
    launched_at: float | None = None,
) -> CVResult:
    """The K folds of ``cfg`` (``cv.folds`` ≥ 2) and their mean ± std, under one MLflow parent run."""
    if cfg.cv.folds < 2:
        raise ValueError("cross-validation needs cv.folds >= 2")
    name = default_run_name(cfg)
    parent = ""
    if cfg.tracking.enabled:
        from montage.tracking.runs import create_run, prepare_tracking

        prepare_tracking(cfg)
        head = copy.deepcopy(cfg)
        head.run.name = name
        parent = create_run(head, {schema.ROLE: "cv", schema.CV_FOLDS: str(cfg.cv.folds)})
    configs = fold_configs(cfg, name, parent)
    if use_ray:
        from montage.launch.session import ensure_ray
        from montage.launch.train import fit_ray

        ensure_ray(address)
        if cfg.cv.parallel:
            with ThreadPoolExecutor(max_workers=len(configs), thread_name_prefix="cv-fold") as pool:
                summaries = list(pool.map(lambda c: fit_ray(c, launched_at=launched_at), configs))
        else:
            summaries = [fit_ray(c, launched_at=launched_at) for c in configs]
    else:
        from montage.launch.local import fit_local

        summaries = [fit_local(c, launched_at=launched_at) for c in configs]
    mean, std = aggregate(summaries)
    result = CVResult(name, summaries, mean, std, parent or None)
    if parent:
        _log_parent(cfg, parent, result)
    log.info("%s", result.table())
    return result


def _log_parent(cfg: ExperimentConfig, run_id: str, result: CVResult) -> None:
    import mlflow
    from mlflow.entities import Metric

    from montage.tracking.runs import resolve_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri))
    now = int(time.time() * 1000)
    metrics = [Metric(cv_key(k, "mean"), v, now, 0) for k, v in result.mean.items()]
    metrics += [Metric(cv_key(k, "std"), v, now, 0) for k, v in result.std.items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    folds = [
        {"fold": k, "run_dir": s.run_dir, "mlflow_run_id": s.mlflow_run_id, "best": s.best_metrics, "error": s.error}
        for k, s in enumerate(result.folds)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.json"
        path.write_text(json.dumps({"mean": result.mean, "std": result.std, "folds": folds}, indent=2, default=str))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FAILED" if result.error else "FINISHED")
