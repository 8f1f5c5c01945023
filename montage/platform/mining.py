"""Hard-negative mining (``data.hard_mining``): the training samples the model does worst on
are drawn more often, through the platform's sampler.

Every ``every`` epochs the :class:`HardMining` hook scores each training sample with the task's
own per-sample validation metric (``eval_step``, one forward pass in eval mode over this rank's
share, summed over the ranks so every rank holds every score), marks the hardest ``fraction``
and hands :class:`~montage.platform.sampling.ShardSampler` draw weights (``weight`` for those,
1 for the rest). The sampler then draws each epoch's order with replacement, seeded by
(seed, epoch) alone: all ranks agree, and since the weights are the hook's checkpointed state a
resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from montage.core.sections import HardMiningConfig
from montage.platform.loop import Hook, Loop
from montage.platform.sampling import ShardSampler

log = logging.getLogger("montage.platform.loop")


def mining_weights(scores: torch.Tensor, fraction: float, weight: float, hard_is_high: bool) -> torch.Tensor:
    """Draw weights: ``weight`` for the hardest ``fraction`` of ``scores`` (NaN counts as hardest), else 1."""
    s = scores.double().clone()
    worst = float("inf") if hard_is_high else float("-inf")
    s[torch.isnan(s)] = worst
    k = max(1, round(fraction * len(s)))
    hard = torch.topk(s if hard_is_high else -s, k).indices
    w = torch.ones(len(s), dtype=torch.float64)
    w[hard] = weight
    return w


class HardMining(Hook):
    key = "hard_mining"

    def __init__(self, cfg: HardMiningConfig) -> None:
        self.cfg = cfg
        self.metric = cfg.metric
        self.hard_is_high = True
        self.weights: torch.Tensor | None = None

    def resolve(self, monitor: tuple[str, str]) -> None:
        """The metric that scores a sample: ``metric``, else the task's monitored one. The monitor
        has a direction; any other named metric is taken as a loss (higher = harder)."""
        watched = monitor[0].removeprefix("val/")
        self.metric = self.cfg.metric or watched
        self.hard_is_high = monitor[1] == "min" if self.metric == watched else True

    @staticmethod
    def sampler(loop: Loop) -> ShardSampler:
        s = getattr(loop.train_loader, "sampler", None)
        if not hasattr(s, "set_weights"):
            raise TypeError(f"data.hard_mining needs the platform's ShardSampler, the train loader has {type(s)}")
        return s

    def before_train(self, loop: Loop) -> None:
        self.resolve(loop.task.monitor)
        self.sampler(loop).set_weights(self.weights)

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        if loop.epoch % self.cfg.every:
            return
        scores = self.score(loop)
        self.weights = mining_weights(scores, self.cfg.fraction, self.cfg.weight, self.hard_is_high)
        self.sampler(loop).set_weights(self.weights)
        hard = self.weights > 1
        metrics[f"mining/{self.metric}"] = float(scores.nanmean())
        metrics[f"mining/hard_{self.metric}"] = float(scores[hard].nanmean())
        if loop.is_main:
            log.info(
                "hard mining: %d of %d samples drawn %gx as often (mean %s %.4g vs %.4g overall)",
                int(hard.sum()),
                len(scores),
                self.cfg.weight,
                self.metric,
                metrics[f"mining/hard_{self.metric}"],
                metrics[f"mining/{self.metric}"],
            )

    @torch.no_grad()
    def score(self, loop: Loop) -> torch.Tensor:
        """Every training sample's ``metric`` (this rank scores its share; summed over the ranks)."""
        dataset = loop.train_loader.dataset
        n = len(dataset)
        sampler = ShardSampler(n, loop.cfg.train.batch_size, loop.rank, loop.world_size, train=False)
        order = list(sampler)
        loader = DataLoader(dataset, batch_size=loop.cfg.train.batch_size, sampler=sampler, num_workers=0)
        for net in loop.m.nets.values():
            net.eval()
        values = torch.zeros(n, dtype=torch.float64)
        done = 0
        for batch in loader:
            batch = loop._to_device(batch)
            with loop.autocast():
                out = loop.task.eval_step(loop.m, batch)
            if self.metric not in out:
                raise KeyError(f"data.hard_mining.metric '{self.metric}' is not a metric of eval_step: {sorted(out)}")
            v = out[self.metric].detach().double().cpu().reshape(-1)
            values[order[done : done + len(v)]] = v
            done += len(v)
        if dist.is_available() and dist.is_initialized() and loop.world_size > 1:
            t = values.to(loop.reduce_device())
            dist.all_reduce(t)
            values = t.cpu()
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        w = state.get("weights")
        self.weights = None if w is None else torch.as_tensor(w, dtype=torch.float64)
