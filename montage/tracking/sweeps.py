"""MLflow side of a sweep: the parent run, trial outcomes on the child runs, the summary
plots, and the best trial's registration (through :mod:`montage.tracking.registry`, which
compares it with the champion and moves the alias). ``montage report`` draws the sweep from
these records (:mod:`montage.tracking.report`)."""

from __future__ import annotations

import csv
import logging
import tempfile
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from montage.core import schema
from montage.core.config import ExperimentConfig, to_dict
from montage.tracking.registry import client as mlflow_client
from montage.tracking.registry import register_checkpoint
from montage.tracking.runs import get_experiment_id, git_commit

log = logging.getLogger(__name__)


class TrialStatus(str, Enum):
    """How a sweep trial ended (the value is what tables and MLflow tags show)."""

    FINISHED = "finished"
    STOPPED = "stopped early"  # by the scheduler (ASHA)
    FAILED = "failed"


@dataclass
class TrialRecord:
    """One sweep trial as it ended: what it tried, what it scored, where its results are."""

    trial_id: str
    name: str
    params: dict[str, Any]  # dotted config key → value
    metrics: dict[str, float]  # its last report (val/*, best/*, time/*, epoch)
    epochs: int
    status: TrialStatus
    error: str = ""
    checkpoint: str | None = None  # its best checkpoint (set for the sweep's best trial)
    mlflow_run_id: str | None = None  # its child run under the sweep's parent

    def best(self, metric: str) -> float | None:
        """Its best value of ``metric`` over the epochs it ran."""
        return self.metrics.get(f"best/{metric}")


def parent_run(base: ExperimentConfig, tcfg: Any, params: list[Any], sweep_dir: str, resume: bool) -> str:
    """Create the sweep's parent run (or find it again when resuming)."""
    client = mlflow_client(base.tracking.uri)
    exp_id = get_experiment_id(client, base.tracking.experiment, base.tracking.artifacts, base.tracking.uri)
    if resume:
        found = client.search_runs([exp_id], f"tags.`montage.sweep` = '{tcfg.name}' and tags.`montage.role` = 'sweep'")
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = client.create_run(
        exp_id,
        run_name=tcfg.name,
        tags={
            schema.ROLE: "sweep",
            schema.SWEEP: tcfg.name,
            schema.TASK: tcfg.task,
            schema.SWEEP_DIR: sweep_dir,
            "mlflow.source.git.commit": git_commit() or "unknown",
        },
    )
    rid = run.info.run_id
    from mlflow.entities import Param

    entries = {f"space.{p.key}": p.describe() for p in params}
    entries.update(
        {
            "metric": tcfg.metric,
            "mode": tcfg.mode,
            "num_samples": tcfg.num_samples,
            "seed": tcfg.seed,
            "scheduler": tcfg.scheduler.name,
            "scheduler.grace_period": tcfg.scheduler.grace_period,
            "scheduler.reduction_factor": tcfg.scheduler.reduction_factor,
            "scheduler.max_t": tcfg.scheduler.max_t or base.train.epochs,
            "trial.workers": tcfg.resources.workers,
            "trial.gpus": tcfg.resources.gpus,
            "trial.cv_folds": base.cv.folds,
            "base": tcfg.base,
        }
    )
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in entries.items()])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tune_config.yaml").write_text(yaml.safe_dump(to_dict(tcfg), sort_keys=False))
        (Path(tmp) / "base_config.yaml").write_text(yaml.safe_dump(to_dict(base), sort_keys=False))
        client.log_artifact(rid, str(Path(tmp) / "tune_config.yaml"))
        client.log_artifact(rid, str(Path(tmp) / "base_config.yaml"))
    return rid


def interrupt_sweep(base: ExperimentConfig, parent_id: str, why: str) -> None:
    """The sweep's parent run stops as KILLED until ``--resume`` sets it running again."""
    client = mlflow_client(base.tracking.uri)
    client.set_tag(parent_id, schema.INTERRUPTED, why)
    client.set_terminated(parent_id, "KILLED")


def log_trial_epoch(cfg: ExperimentConfig, run_id: str, metrics: dict[str, float]) -> None:
    """One epoch of a trial's own records (a cross-validated trial's ``cv/`` means), at step ``epoch``.
    A tracking server that does not answer loses the point, with a warning: the trial goes on (its folds'
    runs keep their records in their outboxes)."""
    import time

    from mlflow.entities import Metric

    from montage.tracking.outbox import unreachable

    now, step = int(time.time() * 1000), int(metrics.get("epoch", 0))
    try:
        mlflow_client(cfg.tracking.uri).log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
    except Exception as exc:  # noqa: BLE001 - only an absent server is survived
        if not unreachable(exc):
            raise
        log.warning("MLflow at %s does not answer: epoch %d of run %s not logged (%s)", cfg.tracking.uri, step,
                    run_id, str(exc).splitlines()[0][:200])  # fmt: skip


def end_trial_run(cfg: ExperimentConfig, run_id: str, status: str) -> None:
    """Mark a trial's run ended (``FINISHED``); the sweep's end records every trial's outcome again."""
    from montage.tracking.outbox import unreachable

    try:
        mlflow_client(cfg.tracking.uri).set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001
        if not unreachable(exc):
            raise
        log.warning("MLflow at %s does not answer: run %s stays RUNNING until the sweep ends", cfg.tracking.uri, run_id)


def _child_runs(client: Any, parent_id: str) -> dict[str, Any]:
    exp_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)
    return {r.data.tags.get(schema.TRIAL, ""): r for r in runs}


def finish_sweep(
    trials: list[TrialRecord],
    best: TrialRecord | None,
    tcfg: Any,
    base: ExperimentConfig,
    params: list[Any],
    parent_id: str,
    version_tags: dict[str, str] | None = None,
) -> dict[str, Any] | None:
    """Record every trial's outcome, summarise on the parent, register and promote the best (with
    ``version_tags`` on its version). Runs nested under a trial's run (a cross-validated trial's folds)
    that are still running end as the trial did: a trial the scheduler stopped took them with it."""
    client = mlflow_client(base.tracking.uri)
    children = _child_runs(client, parent_id)
    exp_id = client.get_run(parent_id).info.experiment_id
    for t in trials:
        run = children.get(t.trial_id)
        if run is None:  # failed before its first epoch: still leave a record
            run = client.create_run(
                exp_id,
                run_name=t.name,
                tags={"mlflow.parentRunId": parent_id, schema.TRIAL: t.trial_id, schema.SWEEP: tcfg.name},
            )
        rid = run.info.run_id
        status = t.status
        client.set_tag(rid, schema.TRIAL_STATUS, status.value)
        client.set_tag(rid, schema.STOPPED_EARLY, str(status is TrialStatus.STOPPED).lower())
        if t.error:
            client.set_tag(rid, schema.ERROR, t.error[:5000])
            client.set_terminated(rid, "FAILED")
        elif status is TrialStatus.STOPPED:
            client.set_terminated(rid, "KILLED")
        elif client.get_run(rid).info.status == "RUNNING":
            client.set_terminated(rid, "FINISHED")
        nested = client.search_runs(
            [exp_id], f"tags.`mlflow.parentRunId` = '{rid}' and attributes.status = 'RUNNING'", max_results=1000
        )
        for run in nested:
            client.set_terminated(run.info.run_id, client.get_run(rid).info.status)
        t.mlflow_run_id = rid
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.csv"
        keys = [p.key for p in params]
        with table.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["trial", "status", "epochs", *keys, tcfg.metric, f"best/{tcfg.metric}"])
            for t in trials:
                w.writerow(
                    [
                        t.name,
                        t.status.value,
                        t.epochs,
                        *[t.params.get(k) for k in keys],
                        t.metrics.get(tcfg.metric),
                        t.best(tcfg.metric),
                    ]
                )
        client.log_artifact(parent_id, str(table))
        for path in optuna_plots(trials, params, tcfg, Path(tmp)):
            client.log_artifact(parent_id, str(path), "optuna")
    registered = None
    if best is not None:
        value = best.best(tcfg.metric)
        client.log_metric(parent_id, f"best/{tcfg.metric}", value)
        client.set_tag(parent_id, schema.BEST_TRIAL, best.name)
        for k, v in best.params.items():
            client.set_tag(parent_id, f"best.{k}", str(v))
        if best.checkpoint and best.mlflow_run_id:
            registered = register_checkpoint(
                base,
                best.checkpoint,
                best.mlflow_run_id,
                tcfg.metric,
                tcfg.mode,
                value,
                tcfg.name,
                best.params,
                tcfg.promote,
                version_tags,
            )
    all_failed = all(t.error for t in trials)
    client.set_terminated(parent_id, "FAILED" if all_failed else "FINISHED")
    return registered


def optuna_plots(trials: list[TrialRecord], params: list[Any], tcfg: Any, out: Path) -> list[Path]:
    """Parallel-coordinate and parameter-importance PNGs from the finished trials (via an
    in-memory Optuna study; matplotlib backend, no plotly needed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = [t for t in trials if not t.error and t.best(tcfg.metric) is not None]
    if len(done) < 2:
        return []
    dists = {}
    for p in params:
        if p.kind == "choice":
            dists[p.key] = optuna.distributions.CategoricalDistribution([str(v) for v in p.values])
        elif p.kind == "int":
            dists[p.key] = optuna.distributions.IntDistribution(int(p.low), int(p.high))
        else:
            dists[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.kind == "loguniform")
    study = optuna.create_study(direction="maximize" if tcfg.mode == "max" else "minimize")
    for t in done:
        values = {k: (str(v) if params[i].kind == "choice" else v) for i, (k, v) in enumerate(t.params.items())}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=t.best(tcfg.metric)))
    written = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import plot_parallel_coordinate, plot_param_importances

        for name, fn in (
            ("parallel_coordinate", plot_parallel_coordinate),
            ("param_importances", plot_param_importances),
        ):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "experimental" notices of optuna's matplotlib backend
                    ax = fn(study)
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                path = out / f"{name}.png"
                fig.savefig(path, dpi=100, bbox_inches="tight")
                plt.close(fig)
                written.append(path)
            except Exception as exc:  # noqa: BLE001 - a plot is a nicety, never a failed sweep
                log.warning("optuna %s plot skipped: %s", name, exc)
    except ImportError as exc:
        log.warning("optuna plots skipped: %s", exc)
    return written
