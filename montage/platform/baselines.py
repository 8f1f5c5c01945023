"""The classical baselines of a task (:meth:`Task.baselines`) over a whole validation set,
beside the trained model's figures: what ``bench/quality.py`` and ``montage demo`` print."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from montage.platform.task import Task

log = logging.getLogger(__name__)


@torch.no_grad()
def measure_baselines(task: Task, val: Dataset, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Baseline name → metric name → mean over every sample of ``val`` (the task must have built
    its datasets: some baselines, e.g. pix2pix's mean face, come from the training set)."""
    sums: dict[str, dict[str, float]] = {}
    count = 0
    for batch in DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=0):
        for name, metrics in task.baselines(batch).items():
            acc = sums.setdefault(name, {})
            for key, value in metrics.items():
                acc[key] = acc.get(key, 0.0) + float(value.detach().float().sum())
        count += next(iter(batch.values())).shape[0]
    return {name: {k: v / max(count, 1) for k, v in acc.items()} for name, acc in sums.items()}


@dataclass(frozen=True)
class Comparison:
    """One metric of a trained model beside its strongest baseline."""

    metric: str
    mode: str  # "max" | "min": which way is better
    model: float
    best_name: str  # the strongest baseline on this metric
    best: float

    @property
    def beats(self) -> bool:
        return self.model > self.best if self.mode == "max" else self.model < self.best

    @property
    def ratio(self) -> float:
        """model ÷ strongest baseline (below 1 is better for a "min" metric)."""
        return self.model / self.best if self.best else float("nan")


def strongest(baselines: dict[str, dict[str, float]], metric: str, mode: str) -> tuple[str, float]:
    """The baseline with the best value of ``metric`` (the key without ``val/``) and that value."""
    scored = [(name, m[metric]) for name, m in baselines.items() if metric in m]
    if not scored:
        raise KeyError(f"no baseline reports '{metric}'; baselines: {', '.join(baselines) or 'none'}")
    return (max if mode == "max" else min)(scored, key=lambda nv: nv[1])


def compare(model: float, baselines: dict[str, dict[str, float]], metric: str, mode: str) -> Comparison:
    name, value = strongest(baselines, metric, mode)
    return Comparison(metric, mode, model, name, value)
