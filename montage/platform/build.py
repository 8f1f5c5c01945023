"""What the loop is built from: optimizers, schedulers, the AMP dtype, data loaders and the
task's networks on their device (wrapped for DDP and ``torch.compile`` when asked).

:func:`montage.platform.runner.build_loop` assembles a :class:`~montage.platform.loop.Loop`
from these; nothing here knows Ray or any task by name.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from montage.core.config import ExperimentConfig, OptimConfig, SchedConfig
from montage.platform.sampling import ShardSampler
from montage.platform.task import Modules, Task


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, **overrides: Any) -> torch.optim.Optimizer:
    lr = overrides.get("lr", cfg.lr)
    wd = overrides.get("weight_decay", cfg.weight_decay)
    betas = tuple(overrides.get("betas", cfg.betas))
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)


def make_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, epochs: int, steps_per_epoch: int = 1) -> Any:
    """A scheduler, or None: stepped once per epoch, or once per optimizer step when
    ``cfg.per_step`` (then ``steps_per_epoch`` is the number of optimizer steps in an epoch)."""
    if cfg.name == "onecycle":
        total = epochs * steps_per_epoch + 1  # the run's last step lands on the schedule's end (lr → lr/(25·10⁴))
        # max_lr is the optimizer's own lr (a task may set another lr per optimizer)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=[g["lr"] for g in opt.param_groups],
            total_steps=total,
            pct_start=cfg.warmup,
            anneal_strategy="cos",
            cycle_momentum=False,
        )
    if cfg.name == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=cfg.t0, T_mult=cfg.t_mult, eta_min=cfg.eta_min
        )
    if cfg.name == "linear_decay":
        hold = cfg.constant_epochs
        decay = max(1, epochs - hold)
        # a picklable-free LambdaLR: state_dict() keeps no function objects
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 - max(0, e - hold) / float(decay))
    return None


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``, or None for full precision."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def seed_worker(worker_id: int) -> None:
    """Seed numpy in each DataLoader worker (torch and ``random`` are seeded by torch)."""
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(
    dataset: Dataset, cfg: ExperimentConfig, train: bool, device: torch.device, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """This rank's loader: a :class:`ShardSampler` picks its share of each global batch
    (training) or of the validation set. Loader processes start afresh each epoch (not
    persistent) so they see the epoch the loop sets on the dataset."""
    workers = cfg.train.loader_workers
    gen = torch.Generator()
    gen.manual_seed(cfg.train.seed)  # reseeded per (seed, rank, epoch) by the loop: loader processes' base seeds
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=ShardSampler(len(dataset), cfg.train.batch_size, rank, world_size, train=train, seed=cfg.train.seed),
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=device.type == "cuda",
        worker_init_fn=seed_worker,
        generator=gen,
    )


def optimizer_steps_per_epoch(loader: Any, cfg: ExperimentConfig) -> int:
    """Optimizer steps one epoch of ``loader`` makes (``train.max_steps`` and ``accumulate`` applied)."""
    batches = len(loader)
    if cfg.train.max_steps:
        batches = min(batches, cfg.train.max_steps)
    return max(1, math.ceil(batches / cfg.train.accumulate))


def build_modules(
    task: Task,
    device: torch.device,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    steps_per_epoch: int = 1,
) -> Modules:
    """Networks on ``device`` (wrapped, e.g. in DDP), one optimizer + scheduler per group.
    ``steps_per_epoch`` (optimizer steps) sizes a per-step schedule."""
    cfg = task.cfg
    nets = task.build_nets()
    if cfg.init.checkpoint:
        init_from_checkpoint(task, nets, cfg.init.checkpoint)
    for name, net in nets.items():
        net.to(device)
        if cfg.train.channels_last:
            net.to(memory_format=torch.channels_last)
    optimizers = {
        name: make_optimizer(params, cfg.optim, **over) for name, (params, over) in task.param_groups(nets).items()
    }
    if wrap is not None:
        nets = {
            name: wrap(net) if any(p.requires_grad for p in net.parameters()) else net for name, net in nets.items()
        }
    if cfg.train.compile != "off":
        # after DDP: dynamo splits the graph at DDP's bucket boundaries so all-reduce overlaps backward
        mode = None if cfg.train.compile == "default" else cfg.train.compile
        nets = {name: torch.compile(net, mode=mode, backend=cfg.train.compile_backend) for name, net in nets.items()}
    schedulers = {
        name: make_scheduler(opt, cfg.sched, cfg.train.epochs, steps_per_epoch) for name, opt in optimizers.items()
    }
    teacher = None
    if cfg.distill.teacher:
        from montage.platform.inference import load_teacher

        teacher = load_teacher(task, cfg.distill.teacher, device)
    return Modules(
        nets=nets,
        optimizers=optimizers,
        schedulers={k: v for k, v in schedulers.items() if v is not None},
        teacher=teacher,
    )


def init_from_checkpoint(task: Task, nets: dict[str, nn.Module], path: str) -> None:
    """``init.checkpoint``: every network ``path`` holds starts from its weights, reshaped to
    them first (a channel-pruned network trains in its pruned shape)."""
    from montage.platform.checkpoint import load_checkpoint
    from montage.platform.pruning import load_weights

    if "://" in path:
        raise ValueError(
            f"init.checkpoint {path!r} must be a local checkpoint here (the launchers download models:/ URIs)"
        )
    saved = load_checkpoint(path, task=task.name)["nets"]
    missing = sorted(set(nets) - set(saved))
    if missing:
        raise ValueError(f"init.checkpoint {path} holds no weights for network(s) {', '.join(missing)}")
    for name, net in nets.items():
        load_weights(net, saved[name])
