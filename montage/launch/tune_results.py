"""What a finished (or interrupted) Tune run says about its trials: which ended, how each ended,
the sweep's best trial on a common budget, and where its best checkpoint is. Reads Ray Tune's
``ResultGrid`` and a trial's Ray Train result folder; :mod:`montage.launch.tune` runs the sweep."""

from __future__ import annotations

import logging
import math
from typing import Any

from montage.tracking.sweeps import TrialRecord, TrialStatus

log = logging.getLogger(__name__)


def trials_ended(results: Any, ended_before: frozenset[str] | set[str] = frozenset()) -> int:
    """How many trials of a sweep's results ended: failed, returned, stopped by the scheduler, or had ended
    before this session (``ended_before``, :func:`trials_ended_before`, for a resumed sweep).

    Not ``ResultGrid.num_terminated``: on SIGINT Tune saves its state with the running trials still
    running (a resumed sweep continues them) and then stops their actors, which marks them TERMINATED in
    the grid it returns, so a sweep interrupted during its last trials would count as complete. Tune
    adds ``done`` to a trial's last result when the trial returns and when the scheduler stops it, never
    when the interrupt's clean-up does; but a trial restored from a saved sweep may have lost it (see
    :func:`trials_ended_before`)."""
    return sum(
        1
        for r in results
        if r.error is not None or (r.metrics or {}).get("done") or (r.metrics or {}).get("trial_id") in ended_before
    )


def trials_ended_before(path: str, filesystem: Any = None) -> set[str]:
    """The ids of the trials a saved sweep (Tune's experiment folder ``path``) holds as ended, read before
    it is resumed. Their restored last result cannot say so: Tune adds ``done`` to a returning trial's last
    result in place, and a snapshot of the sweep taken between the trial's last report and its return keeps
    serving the result without it (Ray 2.60), so a trial that finished while its model was being logged
    comes back TERMINATED with ``done`` false."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(path, storage_filesystem=filesystem).trials
    return {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}


def trial_status(epochs: int, budget: int, stopped_itself: bool, failed: bool) -> TrialStatus:
    """How a trial ended. A trial that trained every epoch finished, whoever ended its process (ASHA
    stops one that reaches ``max_t`` or is worst at a rung on its last epoch); one that stopped on its
    own rule (the loop's ``train.early_stop``, reported as ``stopped_early`` by
    :class:`~montage.launch.train.RayReportHook`) finished too; any other trial short of its budget was
    stopped by the scheduler. (Tune's ``done`` flag cannot tell: Tune sets it on every trial its
    scheduler stops.)"""
    if failed:
        return TrialStatus.FAILED
    if epochs >= budget or stopped_itself:
        return TrialStatus.FINISHED
    return TrialStatus.STOPPED


def best_trial(trials: list[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The sweep's best trial, compared on the same budget: among the trials that ran to their end (every
    epoch, or the loop's own early stop), never one the scheduler stopped on fewer epochs, whose best is
    the best of a shorter run. Only when no trial finished do the stopped ones that got furthest compete."""
    scored = [t for t in trials if not t.error and t.best(metric) is not None and not math.isnan(t.best(metric))]
    finished = [t for t in scored if t.status is TrialStatus.FINISHED]
    if not finished and scored:
        furthest = max(t.epochs for t in scored)
        finished = [t for t in scored if t.epochs == furthest]
    if not finished:
        return None
    pick = max if mode == "max" else min
    return pick(finished, key=lambda t: t.best(metric))


def best_checkpoint(trainer: Any, metric: str, mode: str, local: str) -> tuple[str | None, float | None]:
    """The best checkpoint on ``metric`` of a trial's TorchTrainer run as kept by its CheckpointConfig
    (``trainer``: the run's folder, a :class:`~montage.launch.storage.Storage`), downloaded into ``local``
    when remote, and its value of ``metric``; (None, None) when it kept none."""
    import ray.train

    try:
        result = ray.train.Result.from_path(trainer.path, storage_filesystem=trainer.filesystem)
    except Exception as exc:  # noqa: BLE001 - a trial stopped before its first report has no run
        log.warning("no checkpoints for %s: %s", trainer, exc)
        return None, None
    ckpt = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    if ckpt is None:
        return None, None
    value = next((m.get(metric) for c, m in result.best_checkpoints if c.path == ckpt.path), None)
    return (ckpt.to_directory(local) if trainer.remote else ckpt.path), value
