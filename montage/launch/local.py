"""Train in this process (no Ray): the same loop, hooks, files and MLflow run as under Ray,
one rank, no DDP. For debugging, tests and ``montage train --no-ray``.

``train.batch_size`` is per worker everywhere, and the global batch ``scaling.workers × batch_size``
is what a config trains: in this process the one rank takes the whole global batch, so a step sees the
samples the config's workers see together under Ray (the platform cuts each global batch into the
ranks' shares: docs/reliability.md), with the same steps per epoch and learning-rate schedule."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from montage.core.config import ExperimentConfig, save_config
from montage.launch.lifecycle import begin, rank_hooks
from montage.platform.loop import Hook
from montage.platform.runner import RunSummary, WorkerEnv, build_loop, resume_state
from montage.tracking.registry import resolve_model_sources

log = logging.getLogger(__name__)


def with_workers(cfg: ExperimentConfig, workers: int) -> ExperimentConfig:
    """``cfg`` on ``workers`` workers at the global batch its configured workers have (the
    per-worker batch scaled, so a recipe's steps and learning rate stay as measured)."""
    global_batch = cfg.train.batch_size * cfg.scaling.workers
    if global_batch % workers:
        log.warning(
            "the global batch %d does not split over %d workers: %d per worker",
            global_batch,
            workers,
            max(1, global_batch // workers),
        )
    cfg.train.batch_size, cfg.scaling.workers = max(1, global_batch // workers), workers
    return cfg


def as_one_process(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` for :func:`fit_local`: one process at the global batch of its configured workers."""
    return with_workers(cfg, 1)


def fit_local(
    cfg: ExperimentConfig,
    resume: str | Path | None = None,
    device: str | None = None,
    extra_hooks: list[Hook] | None = None,
    launched_at: float | None = None,
) -> RunSummary:
    """Train in this process: same loop, hooks and files as under Ray, one rank at the global batch of
    the config's workers (:func:`as_one_process`; the run records ``scaling.workers=1`` and that batch).

    Writes ``<run.storage>/<run.name>/{config.yaml,latest.pt,best.pt}``; returns a summary.
    """
    if "://" in str(resume or cfg.run.storage):
        raise ValueError(
            "training in this process writes a local run folder: use Ray (montage train) for s3:// storage"
        )
    if cfg.scaling.workers > 1:
        log.info(
            "one process for scaling.workers=%d: train.batch_size %d per worker → the global batch %d",
            cfg.scaling.workers,
            cfg.train.batch_size,
            cfg.scaling.workers * cfg.train.batch_size,
        )
        as_one_process(cfg)
    run = begin(cfg, resume)
    run_dir = Path(run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    dev = torch.device(device or ("cuda" if cfg.scaling.gpus and torch.cuda.is_available() else "cpu"))
    hooks = rank_hooks(cfg, 0, run_dir, latest=True)
    ckpt = hooks[0]
    hooks += extra_hooks or []
    resolve_model_sources(cfg)
    loop = build_loop(cfg, WorkerEnv(device=dev, launched_at=launched_at), hooks)
    if resume is not None:
        loop.load_state_dict(resume_state(resume if Path(resume).is_file() else run_dir, cfg))
        log.info("resumed %s at epoch %d (best %s=%s)", run_dir, loop.epoch, loop.best.metric, loop.best.value)
    metrics = loop.fit()
    mlflow_hook = next((h for h in hooks if getattr(h, "key", "") == "mlflow"), None)
    latest = run_dir / "latest.pt"
    return RunSummary(
        run_dir=str(run_dir),
        metrics=metrics,
        best_metric=loop.best.metric,
        best_value=loop.best.value,
        best_epoch=loop.best.epoch,
        best_checkpoint=str(ckpt.best_path) if ckpt.best_path.is_file() else None,
        checkpoint=str(latest) if latest.is_file() else None,
        mlflow_run_id=getattr(mlflow_hook, "run_id", None),
    )
