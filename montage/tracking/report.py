"""What ``montage report`` shows, read from MLflow: a sweep (its parent run and one child run per
trial), a set of runs, or a task's registry versions, each as a list of :class:`RunData` (label,
status, params, per-epoch metric history, the epochs that have a sample grid).

The page itself is drawn by :mod:`montage.tracking.report_page`; this module only reads. It uses
an ``MlflowClient`` bound to the tracking URI, never MLflow's process-wide state.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from montage.core import schema
from montage.core.registry import TASKS
from montage.tracking.registry import CHAMPION, model_name
from montage.tracking.runs import resolve_tracking_uri

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"  # MlflowHook logs the SampleGrid of every K-th epoch as samples/epoch_NNN.png
_SAMPLE = re.compile(r"epoch_(\d+)\.png$")
_SCHEDULER_KEYS = ("scheduler.grace_period", "scheduler.reduction_factor", "scheduler.max_t")
CURVE_KEYS = ("train/total", "val/loss")  # plotted beside the monitored metric when a run logged them


@dataclass
class RunData:
    """One run of the report (a sweep trial, a run, or the run behind a registry version)."""

    run_id: str
    label: str
    status: str  # finished | stopped early | failed | running | killed
    params: dict[str, str] = field(default_factory=dict)  # the flattened config as logged
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric → [(epoch, value)]
    sample_epochs: list[int] = field(default_factory=list)
    note: str = ""  # e.g. the version's alias and variant

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped early"

    @property
    def epochs(self) -> int:
        return max((e for e, _ in self.history.get("epoch", [])), default=0) or max(
            (e for vals in self.history.values() for e, _ in vals), default=0
        )

    def best(self, metric: str, mode: str) -> tuple[int, float] | None:
        """(epoch, value) of the run's best ``metric``, or None when it never logged it."""
        vals = [(e, v) for e, v in self.history.get(metric, []) if not math.isnan(v)]
        if not vals:
            return None
        return (max if mode == "max" else min)(vals, key=lambda ev: ev[1])  # a tie: the earlier epoch

    def value_at(self, metric: str, epoch: int) -> float | None:
        """``metric`` at ``epoch`` (the last value logged at or before it)."""
        vals = [v for e, v in self.history.get(metric, []) if e <= epoch]
        return vals[-1] if vals else None


@dataclass
class ReportData:
    """Everything the page shows."""

    title: str
    kind: str  # sweep | runs | versions
    task: str
    metric: str
    mode: str
    runs: list[RunData]
    space: dict[str, str] = field(default_factory=dict)  # param key → distribution (a sweep's search space)
    parent_run_id: str = ""  # a sweep's parent run: the report is logged there
    tracking_uri: str = ""
    facts: dict[str, str] = field(default_factory=dict)  # header lines (sweep settings, best trial, ...)

    @property
    def baseline_metric(self) -> str:
        """The no-learning baseline a task logs beside its metric: ``val/x`` → ``val/baseline_x``."""
        return self.metric.replace("val/", "val/baseline_", 1) if self.metric.startswith("val/") else ""

    def varied_params(self) -> list[str]:
        """The search space's keys, or (runs, versions) the config keys whose values differ between runs."""
        if self.space:
            return list(self.space)
        keys = sorted({k for r in self.runs for k in r.params})
        skip = ("run.", "tracking.", "scaling.", "distill.teacher", "init.checkpoint")
        varied = [k for k in keys if len({r.params.get(k) for r in self.runs}) > 1 and not k.startswith(skip)]
        return varied[:12]

    def best_run(self) -> RunData | None:
        scored = [(r, r.best(self.metric, self.mode)) for r in self.runs]
        scored = [(r, b) for r, b in scored if b is not None]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda rb: rb[1][1])[0]


def _client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def _run_data(client: Any, run: Any, label: str, metrics: list[str], note: str = "", budget: int = 0) -> RunData:
    """``budget``: a sweep's epochs per trial; a trial that ran fewer, did not fail and whose loop did not
    stop itself (``montage.stop_reason``) was stopped by the scheduler, whatever Tune's ``done`` flag said."""
    tags = run.data.tags
    if tags.get(schema.TRIAL_STATUS):
        status = tags[schema.TRIAL_STATUS]
    else:
        status = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed", "RUNNING": "running"}.get(
            run.info.status, run.info.status.lower()
        )
    history: dict[str, list[tuple[int, float]]] = {}
    for key in [*metrics, "epoch"]:
        if key in run.data.metrics and key not in history:
            pts = sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run.info.run_id, key))
            history[key] = list({e: v for e, v in pts}.items())  # an epoch logged twice: the last record
    try:
        files = client.list_artifacts(run.info.run_id, SAMPLES_DIR)
    except Exception as exc:  # noqa: BLE001 - a run without artifacts is still a row of the report
        log.debug("no samples for %s: %s", run.info.run_id, exc)
        files = []
    epochs = sorted(int(m.group(1)) for f in files if (m := _SAMPLE.search(f.path)))
    data = RunData(run.info.run_id, label, status, dict(run.data.params), history, epochs, note)
    ran = data.epochs
    if budget and 0 < ran < budget and status != "failed" and not tags.get(schema.STOP_REASON):
        data.status = "stopped early"
    return data


def _num(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _metric_keys(task: str, metric: str) -> list[str]:
    baseline = metric.replace("val/", "val/baseline_", 1)
    return [metric, baseline, *CURVE_KEYS]


def _monitor(task: str) -> tuple[str, str]:
    try:
        return TASKS.get(task).monitor
    except Exception:  # noqa: BLE001 - an unknown task: runs still report what they logged
        return ("val/loss", "min")


def _all_experiments(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def load_sweep(sweep: str, uri: str = "") -> ReportData:
    """A sweep by its name or its parent run's id."""
    client = _client(uri)
    parent = None
    if re.fullmatch(r"[0-9a-f]{32}", sweep):
        parent = client.get_run(sweep)
    else:
        found = client.search_runs(
            _all_experiments(client),
            f"tags.`montage.sweep` = '{sweep}' and tags.`montage.role` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        parent = found[0] if found else None
    if parent is None:
        raise FileNotFoundError(f"no sweep named {sweep!r} in {resolve_tracking_uri(uri)}")
    p = parent.data.params
    task = parent.data.tags.get(schema.TASK, "")
    metric, mode = p.get("metric") or _monitor(task)[0], p.get("mode") or _monitor(task)[1]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=5000
    )
    children = sorted(children, key=lambda r: r.info.start_time or 0)
    keys = _metric_keys(task, metric)
    budget = int(_num(p.get("scheduler.max_t")) or 0)
    runs = [_run_data(client, r, r.info.run_name or r.info.run_id[:8], keys, budget=budget) for r in children]
    space = {k[len("space.") :]: v for k, v in sorted(p.items()) if k.startswith("space.")}
    for r in runs:  # a trial's params are the sampled values of the search space
        r.params = {k: r.params.get(k, "") for k in space} | r.params
    facts = {
        "sweep": parent.data.tags.get(schema.SWEEP, parent.info.run_name or ""),
        "parent run": parent.info.run_id,
        "trials": str(len(runs)),
        "scheduler": " ".join(
            [p.get("scheduler", "")] + [f"{k.split('.', 1)[1]}={p[k]}" for k in _SCHEDULER_KEYS if k in p]
        ),
        "best trial": parent.data.tags.get(schema.BEST_TRIAL, "-"),
        "git commit": parent.data.tags.get("mlflow.source.git.commit", "-")[:12],
    }
    title = f"sweep {facts['sweep']}"
    return ReportData(
        title, "sweep", task, metric, mode, runs, space, parent.info.run_id, resolve_tracking_uri(uri), facts
    )


def load_runs(run_ids: list[str], uri: str = "") -> ReportData:
    """A set of runs by id (any task; the first run's task names the metric)."""
    if not run_ids:
        raise ValueError("name at least one run id")
    client = _client(uri)
    fetched = [client.get_run(rid) for rid in run_ids]
    task = fetched[0].data.tags.get(schema.TASK, "")
    metric, mode = _monitor(task)
    runs = [_run_data(client, r, r.info.run_name or r.info.run_id[:8], _metric_keys(task, metric)) for r in fetched]
    facts = {"runs": str(len(runs)), "task": task}
    return ReportData(f"{len(runs)} runs of {task}", "runs", task, metric, mode, runs, tracking_uri=uri, facts=facts)


def load_versions(task: str, versions: list[str] | None = None, uri: str = "") -> ReportData:
    """A task's registry versions (all, or those listed), each shown through the run that made it."""
    client = _client(uri)
    name = model_name(task)
    found = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if versions:
        wanted = {str(v).lstrip("v") for v in versions}
        missing = wanted - {str(v.version) for v in found}
        if missing:
            raise ValueError(f"{name} has no version {', '.join(sorted(missing))}; it has {len(found)}")
        found = [v for v in found if str(v.version) in wanted]
    if not found:
        raise FileNotFoundError(f"no registered versions of {name} in {resolve_tracking_uri(uri)}")
    metric, mode = _monitor(task)
    metric = found[-1].tags.get(schema.METRIC, metric)
    mode = found[-1].tags.get(schema.MODE, mode)
    try:
        champ = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except Exception:  # noqa: BLE001 - no champion yet
        champ = ""
    runs = []
    for v in found:
        variant = v.tags.get(schema.VARIANT, "")
        note = ", ".join(x for x in (f"@{CHAMPION}" if str(v.version) == champ else "", variant) if x)
        label = f"v{v.version}"
        if v.run_id:
            runs.append(_run_data(client, client.get_run(v.run_id), label, _metric_keys(task, metric), note))
        else:
            runs.append(RunData("", label, "registered", note=note))
    facts = {"model": name, "versions": ", ".join(r.label for r in runs), "champion": f"v{champ}" if champ else "-"}
    return ReportData(f"{name} versions", "versions", task, metric, mode, runs, tracking_uri=uri, facts=facts)


def download_sample(data: ReportData, run: RunData, epoch: int, out: Path) -> Path | None:
    """The run's sample grid of ``epoch`` as a local PNG under ``out`` (None when it has none)."""
    if epoch not in run.sample_epochs:
        return None
    client = _client(data.tracking_uri)
    got = client.download_artifacts(run.run_id, f"{SAMPLES_DIR}/epoch_{epoch:03d}.png", str(out))
    return Path(got)
