"""The loop's behaviours, one small class each: best tracking, early stopping, pausing, sample
grids, resource metrics, DDP replica checks and checkpoint files.

:func:`standard_hooks` is what every run gets, in the order they must run (the producers of
metrics before the hooks that log, save or report them); a launcher appends its own (MLflow,
Ray's report) after them. A new behaviour is a new :class:`~montage.platform.loop.Hook`, not a
flag threaded through the loop.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from montage.core.config import ExperimentConfig
from montage.platform.checkpoint import save_checkpoint
from montage.platform.loop import Hook, Loop
from montage.platform.mining import HardMining
from montage.platform.replicas import diverged_ranks

log = logging.getLogger("montage.platform.loop")


class ResourceMetrics(Hook):
    """``time/startup_s`` (the user's command → the first train step, when the launcher says when it
    started) and this process's peak memory (``mem/peak_rss_mb``; CUDA: ``mem/cuda_peak_mb``)."""

    def __init__(self) -> None:
        self.startup_s: float | None = None

    def before_step(self, loop: Loop, index: int) -> None:
        if self.startup_s is None and loop.launched_at is not None:
            self.startup_s = time.time() - loop.launched_at
            if loop.is_main:
                log.info("first train step %.1f s after launch", self.startup_s)

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        metrics["mem/peak_rss_mb"] = peak_rss_mb()
        if loop.device.type == "cuda":
            metrics["mem/cuda_peak_mb"] = torch.cuda.max_memory_allocated(loop.device) / 2**20
        if self.startup_s is not None:
            metrics["time/startup_s"] = self.startup_s


class ReplicaChecks(Hook):
    """``train.check_replicas=N`` (DDP debugging): every N optimizer steps, fail unless every rank
    holds bit-identical parameters (see :mod:`montage.platform.replicas`)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.checks = 0

    def after_optimizer_step(self, loop: Loop, name: str) -> None:
        if loop.world_size > 1 and loop.optimizer_steps % self.every == 0:
            self.check(loop)

    def check(self, loop: Loop) -> None:
        if dist.is_available() and dist.is_initialized():
            diverged = diverged_ranks(loop.m, loop.world_size, loop.reduce_device())
            if diverged:
                raise RuntimeError(
                    f"DDP replicas diverged at epoch {loop.epoch + 1}, optimizer step {loop.optimizer_steps}: "
                    f"rank(s) {diverged} hold other weights than rank 0"
                )
        self.checks += 1

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        if loop.world_size > 1:
            metrics["ddp/replica_checks"] = float(self.checks)


class TrackBest(Hook):
    """Keeps ``loop.best`` (the task's monitored metric at its best epoch), says whether this epoch
    is the best (``loop.is_best``) and adds ``best/<metric>`` to the epoch's metrics."""

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        best = loop.best
        if best.metric not in metrics:
            raise KeyError(f"monitored metric '{best.metric}' was not produced; metrics are {sorted(metrics)}")
        value = metrics[best.metric]
        loop.is_best = best.better(value)
        if loop.is_best:
            best.value, best.epoch = value, loop.epoch
        metrics[f"best/{best.metric}"] = best.value if best.value is not None else float("nan")


class EpochLog(Hook):
    """One line per epoch on rank 0: loss, the monitored metric (and its baseline), time, ``*`` at a best."""

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        if loop.is_main:
            log.info(describe(loop, metrics))


def describe(loop: Loop, metrics: dict[str, float]) -> str:
    monitor = loop.best.metric
    baseline = monitor.replace("val/", "val/baseline_", 1)
    keys = [k for k in ("train/total", "val/loss", monitor, baseline) if k in metrics]
    parts = " ".join(f"{k}={metrics[k]:.4g}" for k in keys)
    mark = " *" if loop.is_best else ""
    epoch = f"{loop.epoch}/{loop.cfg.train.epochs}"
    return f"[{loop.task.name}] epoch {epoch} {parts} ({metrics['time/epoch_s']:.1f}s){mark}"


class EarlyStopping(Hook):
    """``train.early_stop=P``: stop after P epochs without a better monitored metric. The decision
    is kept in the checkpoint, so a resumed run that stopped early stays stopped."""

    key = "early_stop"

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.reason = ""

    def before_train(self, loop: Loop) -> None:
        if self.reason:
            loop.request_stop(self.reason)

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        if loop.epoch - loop.best.epoch >= self.patience:
            self.reason = f"early stop: no {loop.best.metric} improvement for {self.patience} epochs"
            loop.request_stop(self.reason)
            log.info(self.reason)

    def state_dict(self) -> dict[str, Any]:
        return {"reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reason = state.get("reason", "")


class PauseAfter(Hook):
    """``train.pause_after=N``: end this invocation once N epochs are done (continue with ``--resume``;
    the schedule still spans ``train.epochs``). Not kept: a resumed run goes on."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        total = loop.cfg.train.epochs
        if self.epochs <= loop.epoch < total and not loop.should_stop:
            loop.request_stop(f"paused after epoch {loop.epoch} of {total} (train.pause_after): continue with --resume")
            log.info(loop.stop_reason)


class SampleGrid(Hook):
    """``train.sample_every=K``: every K epochs rank 0 keeps an image grid of the first validation
    batch (input | prediction | target) as ``loop.sample_image`` for the tracker."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.wanted = False

    def before_epoch(self, loop: Loop) -> None:
        loop.sample_image = None
        self.wanted = loop.is_main and (loop.epoch + 1) % self.every == 0

    def after_eval_batch(self, loop: Loop, index: int, batch: dict[str, Any]) -> None:
        if self.wanted and index == 0:
            loop.sample_image = loop.task.samples(loop.m, batch)


class CheckpointHook(Hook):
    """Rank 0 writes ``best.pt`` when the monitor improves, ``latest.pt`` (optional) every epoch and
    ``epoch_XXX.pt`` every ``every`` epochs into ``folder``."""

    def __init__(self, folder: str | Path, latest: bool = True, every: int = 0) -> None:
        self.folder = Path(folder)
        self.latest = latest
        self.every = every

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        if not loop.is_main:
            return
        state = None
        if loop.is_best:
            state = loop.state_dict()
            save_checkpoint(state, self.best_path)
        if self.latest:
            save_checkpoint(state or loop.state_dict(), self.folder / "latest.pt")
        if self.every and loop.epoch % self.every == 0:
            save_checkpoint(state or loop.state_dict(), self.folder / f"epoch_{loop.epoch:03d}.pt")


def standard_hooks(cfg: ExperimentConfig) -> list[Hook]:
    """The hooks every run has, in order: metric producers first, then the decisions that read them."""
    t = cfg.train
    hooks: list[Hook] = [ResourceMetrics()]
    if t.check_replicas:
        hooks.append(ReplicaChecks(t.check_replicas))
    hooks += [TrackBest(), EpochLog()]
    if t.early_stop:
        hooks.append(EarlyStopping(t.early_stop))
    if t.pause_after:
        hooks.append(PauseAfter(t.pause_after))
    if t.sample_every:
        hooks.append(SampleGrid(t.sample_every))
    mining = getattr(cfg.data, "hard_mining", None)
    if mining is not None and mining.fraction > 0:
        hooks.append(HardMining(mining))  # before the launcher's checkpoint hook: its draw weights are saved
    return hooks


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
