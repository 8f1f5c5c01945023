"""Assemble a :class:`Loop` for a config: the task, its networks and loaders, the standard hooks,
the resume state of a checkpoint, and the summary a finished run returns.

The launchers call :func:`build_loop`: the Ray Train adapter (:mod:`montage.launch.train`) inside
each worker with DDP wrappers, :func:`montage.launch.local.fit_local` in the current process
(``montage train --no-ray``, debugging and tests).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from montage.core.config import ExperimentConfig, build_config, to_dict
from montage.core.registry import TASKS
from montage.platform.build import build_modules, make_loader, optimizer_steps_per_epoch
from montage.platform.checkpoint import CheckpointError, load_checkpoint
from montage.platform.hooks import standard_hooks
from montage.platform.loop import Hook, Loop
from montage.platform.multiscale import MultiScaleLoader
from montage.platform.sampling import kfold_split, seed_process
from montage.platform.task import Task

log = logging.getLogger(__name__)


def make_task(cfg: ExperimentConfig) -> Task:
    return TASKS.get(cfg.task)(cfg)


def config_from_tree(tree: dict[str, Any]) -> ExperimentConfig:
    task_cls = TASKS.get(tree["task"])
    return build_config(task_cls.name, task_cls.spec, tree)


def default_run_name(cfg: ExperimentConfig) -> str:
    return cfg.run.name or f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    seed_process(seed)


@dataclass(frozen=True)
class KeptCheckpoint:
    """A checkpoint a run kept, with the metrics of the epoch that wrote it."""

    path: str
    metrics: dict[str, float]


@dataclass
class RunSummary:
    """What a fit returns, in this process or under Ray."""

    run_dir: str
    metrics: dict[str, float]  # the last epoch's
    best_metric: str
    best_value: float | None
    best_epoch: int
    best_checkpoint: str | None
    checkpoint: str | None = None  # the latest checkpoint
    checkpoints: list[KeptCheckpoint] = field(default_factory=list)  # kept ones by epoch (Ray's CheckpointConfig)
    mlflow_run_id: str | None = None
    error: str | None = None
    restarts: int = 0  # worker-group restarts after failures (Ray's FailureConfig)

    @property
    def best_metrics(self) -> dict[str, float]:
        """The metrics of the epoch that wrote the best checkpoint (the last epoch's when unknown)."""
        return next((c.metrics for c in self.checkpoints if c.path == self.best_checkpoint), self.metrics)


@dataclass
class WorkerEnv:
    """Where and how this process trains (filled in by the launcher)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    launched_at: float | None = None  # time.time() at the user's command, for the start-up figure


def build_loop(cfg: ExperimentConfig, env: WorkerEnv, hooks: list[Hook]) -> Loop:
    seed_everything(cfg.train.seed + env.rank)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    task = make_task(cfg)
    train_ds, val_ds = fold_datasets(task) if cfg.cv.folds else task.datasets()
    train_loader: Any = make_loader(
        train_ds, cfg, train=True, device=env.device, rank=env.rank, world_size=env.world_size
    )
    val_loader = make_loader(val_ds, cfg, train=False, device=env.device, rank=env.rank, world_size=env.world_size)
    modules = build_modules(task, env.device, env.wrap_model, optimizer_steps_per_epoch(train_loader, cfg))
    scales = getattr(cfg.data, "scales", None)
    if scales:
        train_loader = MultiScaleLoader(train_loader, scales, cfg.train.seed)
    hooks = standard_hooks(cfg) + hooks
    return Loop(task, modules, train_loader, val_loader, env.device, hooks, env.rank, env.world_size, env.launched_at)


def fold_datasets(task: Task) -> tuple[Dataset, Dataset]:
    """``cv.folds=K``: fold ``cv.fold`` of the task's training samples validates (without
    augmentation), the other folds train (see :meth:`Task.cv_pool`)."""
    cv = task.cfg.cv
    train_pool, plain_pool = task.cv_pool()
    train_idx, val_idx = kfold_split(len(train_pool), cv.folds, cv.fold, cv.seed)
    log.info("cv fold %d/%d: %d train, %d val samples", cv.fold + 1, cv.folds, len(train_idx), len(val_idx))
    return Subset(train_pool, train_idx), Subset(plain_pool, val_idx)


def resume_state(path: str | Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """The latest state of a run folder (or a checkpoint file) for ``cfg``'s task and model."""
    path = Path(path)
    if path.is_dir():
        path = path / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    return load_checkpoint(path, task=cfg.task, model_config=to_dict(cfg.model))
