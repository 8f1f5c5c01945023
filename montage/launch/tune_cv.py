"""Cross-validated sweep trials: ``cv.folds=K`` in a tune config's base (its ``overrides``, or
``base.cv.folds=K`` on the command line) makes every trial fit its K folds and Tune optimise the
cross-validated mean.

A trial runs its K folds as K ``TorchTrainer`` fits, at once from threads of the trial function
(``cv.parallel``, the default: a trial then asks for K times a fit's resources) or one after
another. Each fold's controller passes every epoch's metrics to the trial through a Ray queue
(:class:`FoldReport`); once all K folds have reported an epoch, the trial reports to Tune the mean
and (sample) std over the folds of every validation metric at that epoch, ``cv/<metric>_mean`` /
``_std`` (:class:`FoldCurves`), so ASHA compares trials epoch by epoch as it does single fits. The
trial's best is the best epoch of the mean curve (``best/cv/<metric>_mean``, the std at that epoch
beside it): one epoch for all folds, the budget a refit on all the data would use.

MLflow: the trial's run (a child of the sweep's run, as for any trial) holds the per-epoch ``cv/``
curves; its K folds are runs nested under it (``fold<k>``, in the trial's folder
``<trials>/<trial>/fold<k>``). The sweep's best trial registers the best checkpoint of its best
fold (no refit), with the trial's CV mean as the version's value (:func:`best_fold_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

from montage.core import schema
from montage.core.config import ExperimentConfig
from montage.launch.cv import cv_key, fold_configs, mean_std
from montage.launch.lifecycle import begin
from montage.launch.storage import Storage

log = logging.getLogger(__name__)


def monitor(cfg: ExperimentConfig) -> tuple[str, str]:
    from montage.core.registry import TASKS

    return TASKS.get(cfg.task).monitor


def fits_at_once(base: ExperimentConfig) -> int:
    """How many TorchTrainer fits one trial runs at the same time (its resources are that many fits')."""
    return base.cv.folds if base.cv.folds and base.cv.parallel else 1


@dataclass
class FoldCurves:
    """Per-epoch means over K folds that report their epochs on their own: epoch ``e`` is reported once
    every fold has reported it. A resumed trial whose folds restart at different epochs reports from the
    first epoch they all reach; an epoch already reported (a fold that re-reports its last epoch after a
    resume with nothing left to train) is not reported again."""

    folds: int
    metric: str  # the task's monitored validation metric (val/…)
    mode: str
    pending: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)  # epoch → fold → metrics
    last: int = 0  # the last epoch reported
    best: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return cv_key(self.metric, "mean")

    def add(self, fold: int, metrics: dict[str, Any]) -> list[dict[str, float]]:
        """Fold ``fold``'s report of one epoch; returns the epochs' reports it completes, in order."""
        epoch = int(metrics.get("epoch", 0) or 0)
        if epoch <= self.last:
            return []
        self.pending.setdefault(epoch, {})[fold] = {k: float(v) for k, v in metrics.items() if _number(v)}
        out = []
        for e in sorted(self.pending):
            if len(self.pending[e]) == self.folds:
                out.append(self._report(e, [self.pending[e][k] for k in sorted(self.pending[e])]))
                self.last = e
        self.pending = {e: v for e, v in self.pending.items() if e > self.last}
        return out

    def _report(self, epoch: int, per_fold: list[dict[str, float]]) -> dict[str, float]:
        mean, std = mean_std([{k: v for k, v in m.items() if k.startswith("val/")} for m in per_fold])
        report = {"epoch": float(epoch)}
        for k in mean:
            report[cv_key(k, "mean")], report[cv_key(k, "std")] = mean[k], std[k]
        value = report.get(self.key, math.nan)
        old = self.best.get("mean", math.nan)
        if not math.isnan(value) and (math.isnan(old) or (value > old if self.mode == "max" else value < old)):
            self.best = {"mean": value, "std": report[cv_key(self.metric, "std")], "epoch": float(epoch)}
        if self.best:
            report[f"best/{self.key}"] = self.best["mean"]
            report[f"best/{cv_key(self.metric, 'std')}"] = self.best["std"]
            report["cv/best_epoch"] = self.best["epoch"]
        # a fold that stopped on its own rule (train.early_stop) reports no later epoch: the curve ends here
        report["stopped_early"] = float(any(m.get("stopped_early", 0.0) for m in per_fold))
        return report


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fold_report_callback(queue: Any, fold: int) -> Any:
    """A Ray Train callback (it runs in the fold's controller) that puts each epoch's rank-0 metrics on
    ``queue``, as Tune's own ``TuneReportCallback`` does with its trial's queue."""
    import ray.train

    class FoldReport(ray.train.UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put((fold, dict(metrics[0])))

    return FoldReport()


def _fit_fold(cfg: ExperimentConfig, queue: Any, fold: int, tags: dict[str, str], started: float) -> Any:
    """One fold of a trial: its run (found again when Tune restores the trial) and its TorchTrainer.
    Returns the failure, or None."""
    from montage.launch.train import fit_run, make_trainer

    run = begin(cfg, tags=tags, trial=True)
    trainer = make_trainer(cfg, callbacks=[_fold_report_callback(queue, fold)], tags=tags, launched_at=started)
    return fit_run(run, trainer)[1]


def cv_trial(cfg: ExperimentConfig, tags: dict[str, str], started: float) -> None:
    """The Tune trial of a cross-validated sweep (``cfg``: the trial's config, ``cv.folds`` ≥ 2, its run
    name and storage set): the K folds, and one report to Tune per epoch all of them reached."""
    import ray
    import ray.tune
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from montage.tracking.sweeps import end_trial_run, log_trial_epoch

    run = begin(cfg, tags={**tags, schema.ROLE: "cv", schema.CV_FOLDS: str(cfg.cv.folds)}, trial=True)
    trial_run = cfg.tracking.run_id
    folds = fold_configs(cfg, cfg.run.name, trial_run, storage=run.dir)
    # beside this trial's function (the head): lost with it, and keeping no worker node busy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    curves = FoldCurves(cfg.cv.folds, *monitor(cfg))
    ended: dict[int, BaseException | None] = {}  # fold → its failure (None: it trained to its end)
    sweep = tags.get(schema.SWEEP, "")

    def fit(ks: list[int]) -> None:
        for k in ks:
            try:
                ended[k] = _fit_fold(folds[k], queue, k, {schema.SWEEP: sweep, schema.CV_FOLD: str(k)}, started)
            except BaseException as exc:  # noqa: BLE001 - handed to the trial's thread, which raises it
                ended[k] = exc
            if ended[k] is not None:
                return

    # daemon threads, as Tune's own for the trial function: a trial ASHA stops exits without waiting for its
    # folds' fits (their controllers end with this process), where pool threads would hold it until they end
    groups = [[k] for k in range(len(folds))] if fits_at_once(cfg) > 1 else [list(range(len(folds)))]
    for ks in groups:
        threading.Thread(target=fit, args=(ks,), name=f"cv-fold{ks[0]}", daemon=True).start()
    failure: BaseException | None = None
    while True:
        try:
            fold, metrics = queue.get(timeout=0.5)
        except Empty:
            done = dict(ended)  # before looking at the queue: a fold's reports are queued before it ends
            failure = next((e for e in done.values() if e is not None), None)
            if failure is not None or (len(done) == len(folds) and queue.empty()):
                break
            continue
        for report in curves.add(fold, metrics):
            if trial_run:
                log_trial_epoch(cfg, trial_run, report)
            ray.tune.report(report)  # ASHA may stop the trial here (SystemExit): its folds end with it
    if failure is None and curves.last == 0:
        failure = RuntimeError(f"{cfg.run.name}: the folds ended without reporting an epoch together")
    if failure is not None:
        run.end(failure)  # the trial's run FAILED with the error; the sweep marks the folds' runs
        raise failure
    if trial_run:
        end_trial_run(cfg, trial_run, "FINISHED")
    queue.shutdown()
    log.info("%s: %d folds, %s=%.4g at epoch %d", cfg.run.name, cfg.cv.folds, f"best/{curves.key}",
             curves.best.get("mean", math.nan), int(curves.best.get("epoch", 0)))  # fmt: skip


def best_fold_checkpoint(trial: Storage, cfg: ExperimentConfig, local: str) -> tuple[str | None, dict[str, str]]:
    """The best checkpoint of a CV trial's best fold (the fold whose own best checkpoint scores best on the
    task's monitored metric), and the registry tags that say which. ``trial``: the trial's folder."""
    from montage.launch.tune_results import best_checkpoint

    metric, mode = monitor(cfg)
    found = []
    for k in range(cfg.cv.folds):
        path, value = best_checkpoint(trial.child(f"fold{k}"), metric, mode, f"{local}/fold{k}")
        if path is not None and value is not None and not math.isnan(value):
            found.append((value, k, path))
    if not found:
        return None, {}
    value, k, path = (max if mode == "max" else min)(found, key=lambda f: f[0])
    tags = {schema.CV_FOLDS: str(cfg.cv.folds), schema.CV_FOLD: str(k), schema.CV_FOLD_VALUE: repr(value)}
    return path, tags
