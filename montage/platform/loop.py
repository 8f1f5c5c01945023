"""The one generic training loop.

It knows nothing of Ray or of any task: a :class:`Task` supplies the steps, hooks add every
behaviour (best tracking, early stopping, checkpoints, tracking, reporting; see
:mod:`montage.platform.hooks`), and ``torch.distributed`` — when a launcher has initialised it
— is only used to average metrics across ranks. The loop itself is the order of calls::

    before_train
    for each epoch:    before_epoch
        for each batch:    before_step → task.train_step (→ before/after_optimizer_step) → after_step
        for each val batch:    after_eval_batch
        after_epoch(metrics)        (hooks add metrics, decide to stop, save, log, report)
    after_train                     (on_error instead when the run ends on an exception)
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from montage.core.config import to_dict
from montage.platform.build import resolve_amp
from montage.platform.sampling import seed_for, seed_process, set_data_epoch
from montage.platform.task import Batch, Modules, Task

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------- hooks


class Hook:
    """Behaviour added to the loop: override what you need. A hook with a ``key`` keeps its
    ``state_dict`` in checkpoints (and gets it back on resume)."""

    key: str = ""

    def before_train(self, loop: Loop) -> None: ...

    def before_epoch(self, loop: Loop) -> None: ...

    def before_step(self, loop: Loop, index: int) -> None:
        """Before train batch ``index`` of this epoch (already on the device) goes to ``train_step``."""

    def before_optimizer_step(self, loop: Loop, name: str) -> None:
        """Optimizer ``name``'s gradients are ready (unscaled under fp16, after clipping), not applied yet."""

    def after_optimizer_step(self, loop: Loop, name: str) -> None:
        """Optimizer ``name`` stepped (``loop.optimizer_steps`` counts the steps of this process)."""

    def after_step(self, loop: Loop, index: int, terms: dict[str, torch.Tensor]) -> None:
        """``train_step`` returned the loss terms of train batch ``index``."""

    def after_eval_batch(self, loop: Loop, index: int, batch: Batch) -> None:
        """Validation batch ``index`` was scored (inside the loop's autocast)."""

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        """``loop.epoch`` epochs are done; ``metrics`` may be added to by hooks earlier in the list."""

    def after_train(self, loop: Loop) -> None: ...

    def on_error(self, loop: Loop, exc: BaseException) -> None:
        """The run is ending on ``exc`` (raised again after every hook has seen it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Best:
    metric: str
    mode: str
    value: float | None = None
    epoch: int = -1

    def better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value


# --------------------------------------------------------------------------------- loop


class _Stepper:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.boundary = True

    def autocast(self) -> Any:
        return self.loop.autocast()

    def optimize(self, loss: torch.Tensor, name: str = "main") -> None:
        loop = self.loop
        if name not in loop.m.optimizers:
            raise KeyError(f"no optimizer '{name}'; this task has {sorted(loop.m.optimizers)}")
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"non-finite loss for optimizer '{name}' at epoch {loop.epoch}: {loss.item()}")
        opt, scaler = loop.m.optimizers[name], loop.scalers[name]
        scaler.scale(loss / loop.cfg.train.accumulate).backward()
        if not self.boundary:
            return
        if loop.cfg.train.grad_clip > 0:
            scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, loop.cfg.train.grad_clip)
        loop.call("before_optimizer_step", name)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if loop.cfg.sched.per_step and name in loop.m.schedulers:
            loop.m.schedulers[name].step()
        loop.optimizer_steps += 1
        loop.call("after_optimizer_step", name)


@dataclass
class Loop:
    """Epochs of ``task.train_step`` / ``task.eval_step`` with hooks around them."""

    task: Task
    m: Modules
    train_loader: Iterable[Batch]
    val_loader: Iterable[Batch]
    device: torch.device
    hooks: list[Hook] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    launched_at: float | None = None  # time.time() when the user's command started: start-up is reported

    def __post_init__(self) -> None:
        self.cfg = self.task.cfg
        self.amp_dtype = resolve_amp(self.cfg.train.amp, self.device)
        fp16 = self.amp_dtype == torch.float16
        self.scalers = {n: torch.amp.GradScaler(self.device.type, enabled=fp16) for n in self.m.optimizers}
        self.epoch = 0  # epochs completed
        self.best = Best(*self.task.monitor)  # kept up to date by the TrackBest hook
        self.is_best = False  # this epoch set the best so far
        self.last_metrics: dict[str, float] = {}
        self.sample_image: np.ndarray | None = None  # set by the SampleGrid hook on sampling epochs
        self.should_stop = False
        self.stop_reason = ""
        self.optimizer_steps = 0  # in this process (not restored on resume)

    # -- context -----------------------------------------------------------------------
    def call(self, point: str, *args: Any) -> None:
        """Every hook's ``point`` method, in order."""
        for hook in self.hooks:
            getattr(hook, point)(self, *args)

    def request_stop(self, reason: str) -> None:
        """End the run after this epoch (the hooks of this epoch still run)."""
        self.should_stop, self.stop_reason = True, reason

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _to_device(self, batch: Batch) -> Batch:
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, non_blocking=True)
                if self.cfg.train.channels_last and v.ndim == 4 and v.is_floating_point():
                    v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    def _reduce(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        if self._distributed():
            t = torch.tensor([[sums[k], counts[k]] for k in keys], dtype=torch.float64, device=self.reduce_device())
            dist.all_reduce(t)
            return {k: (t[i, 0] / t[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}
        return {k: sums[k] / max(counts[k], 1) for k in keys}

    def _sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        if self._distributed():
            t = torch.tensor([value], dtype=torch.float64, device=self.reduce_device())
            dist.all_reduce(t)
            return float(t.item())
        return value

    def reduce_device(self) -> torch.device:
        """Where collectives run: the GPU under NCCL, else the CPU."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _progress(self, loader: Iterable[Any], desc: str, total: int | None) -> Iterable[Any]:
        if not (self.is_main and self.cfg.train.progress and sys.stderr.isatty()):
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True)

    # -- epochs ------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg.train
        for net in self.m.nets.values():
            net.train()
        # every draw of this epoch is a function of (seed, rank, epoch): resumable, and the sample
        # order and augmentation of the global batch do not depend on the number of workers
        seed_process(seed_for(cfg.seed, self.rank, self.epoch))
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # ShardSampler: one permutation per epoch, agreed by all ranks
        gen = getattr(self.train_loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed_for(cfg.seed, self.rank, self.epoch, 1))  # loader processes' base seeds
        set_data_epoch(getattr(self.train_loader, "dataset", None), self.epoch)
        total = _len_or_none(self.train_loader)
        if cfg.max_steps:
            total = min(total, cfg.max_steps) if total else cfg.max_steps
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        stepper = _Stepper(self)
        for opt in self.m.optimizers.values():
            opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(self._progress(self.train_loader, f"epoch {self.epoch + 1}", total)):
            if cfg.max_steps and i >= cfg.max_steps:
                break
            batch = self._to_device(batch)
            self.call("before_step", i)
            last = total is not None and i + 1 >= total
            stepper.boundary = (i + 1) % cfg.accumulate == 0 or last
            with contextlib.ExitStack() as stack:
                if not stepper.boundary:
                    for net in self.m.nets.values():
                        if hasattr(net, "no_sync"):
                            stack.enter_context(net.no_sync())
                terms = self.task.train_step(self.m, batch, stepper)
            self.call("after_step", i, terms)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0.0) + 1
        if not self.cfg.sched.per_step:
            for sched in self.m.schedulers.values():
                sched.step()
        return {f"train/{k}": v for k, v in self._reduce(sums, counts).items()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        for net in self.m.nets.values():
            net.eval()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        samples = 0
        for i, batch in enumerate(self.val_loader):
            if self.cfg.train.max_val_steps and i >= self.cfg.train.max_val_steps:
                break
            batch = self._to_device(batch)
            with self.autocast():
                values = self.task.eval_step(self.m, batch)
                self.call("after_eval_batch", i, batch)
            for k, v in values.items():
                v = v.detach().float()
                sums[k] = sums.get(k, 0.0) + float(v.sum())
                counts[k] = counts.get(k, 0.0) + v.numel()
            samples += _batch_len(batch)
        out = {f"val/{k}": v for k, v in self._reduce(sums, counts).items()}
        out["val/samples"] = self._sum(samples)  # each validation sample once, over all ranks
        return out

    def fit(self) -> dict[str, float]:
        try:
            return self._fit()
        except BaseException as exc:
            for hook in self.hooks:
                try:
                    hook.on_error(self, exc)
                except Exception:  # noqa: BLE001 - never hide the original error
                    log.exception("hook %s failed while handling %r", type(hook).__name__, exc)
            raise

    def _fit(self) -> dict[str, float]:
        epochs = self.cfg.train.epochs
        self.call("before_train")
        if self.epoch >= epochs or self.should_stop:
            why = f" ({self.stop_reason})" if self.stop_reason else ""
            log.info("nothing to do: %d of %d epochs already done%s", self.epoch, epochs, why)
        while self.epoch < epochs and not self.should_stop:
            self.call("before_epoch")
            t0 = time.perf_counter()
            metrics = self.train_epoch()
            metrics["time/train_s"] = time.perf_counter() - t0
            metrics.update(self.evaluate())
            self.epoch += 1
            metrics["epoch"] = self.epoch
            metrics["lr"] = next(iter(self.m.optimizers.values())).param_groups[0]["lr"] if self.m.optimizers else 0.0
            metrics["time/epoch_s"] = time.perf_counter() - t0
            self.last_metrics = metrics
            self.call("after_epoch", metrics)
        self.call("after_train")
        return self.last_metrics

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "config": to_dict(self.cfg),
            "epoch": self.epoch,
            "best": {
                "metric": self.best.metric,
                "mode": self.best.mode,
                "value": self.best.value,
                "epoch": self.best.epoch,
            },
            "metrics": {k: float(v) for k, v in self.last_metrics.items()},
            "nets": {n: self.m.unwrap(n).state_dict() for n in self.m.nets},
            "optimizers": {n: o.state_dict() for n, o in self.m.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.m.schedulers.items()},
            "scalers": {n: s.state_dict() for n, s in self.scalers.items()},
            "hooks": {h.key: h.state_dict() for h in self.hooks if h.key},
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n in self.m.nets:
            self.m.unwrap(n).load_state_dict(state["nets"][n])
        for n, o in self.m.optimizers.items():
            o.load_state_dict(state["optimizers"][n])
        for n, s in self.m.schedulers.items():
            s.load_state_dict(state["schedulers"][n])
        for n, s in self.scalers.items():
            if n in state.get("scalers", {}):
                s.load_state_dict(state["scalers"][n])
        self.epoch = int(state["epoch"])
        best = state["best"]
        self.best.value, self.best.epoch = best["value"], best["epoch"]
        self.last_metrics = dict(state.get("metrics", {}))
        for h in self.hooks:
            if h.key and h.key in state.get("hooks", {}):
                h.load_state_dict(state["hooks"][h.key])
        if self.world_size == 1 and "rng" in state:  # DDP ranks keep their own seeds
            torch.set_rng_state(state["rng"]["torch"].cpu())


def _batch_len(batch: Batch) -> int:
    return next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim), 0)


def _len_or_none(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
