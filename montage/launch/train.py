"""Ray Train adapter: the generic loop inside ``TorchTrainer`` workers (DDP over N workers).

Resuming follows Ray Train V2: running again with the same ``RunConfig(name, storage_path)``
makes ``ray.train.get_checkpoint()`` return the run's latest checkpoint, from which every
worker restores model, optimizers, schedulers, scalers, epoch and best-so-far.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from montage.core.config import ExperimentConfig, to_dict
from montage.launch.lifecycle import Run, begin, rank_hooks
from montage.launch.session import ensure_ray, refuse_local_tracking_on_a_cluster
from montage.launch.storage import Storage
from montage.platform.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from montage.platform.loop import Hook, Loop
from montage.platform.runner import KeptCheckpoint, RunSummary, WorkerEnv, build_loop, config_from_tree
from montage.tracking.registry import resolve_model_sources

log = logging.getLogger(__name__)


class RayReportHook(Hook):
    """Every worker reports each epoch's metrics; rank 0 attaches the full-state checkpoint.

    A run resumed with nothing left to do (its last epoch, or its early stop, was checkpointed just
    before an interrupt killed it) reports its final metrics once more: whoever listens — Tune's
    scheduler and searcher, the trial's result, this run's ``Result`` — last heard of an earlier
    epoch, and would otherwise keep that as the run's outcome."""

    def __init__(self, staging: str | None = None) -> None:
        self.reported = False
        self.staging = staging  # where rank 0 writes each checkpoint before Ray copies it (see _staging)

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        import ray.train

        self.reported = True
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["stopped_early"] = float(loop.should_stop and bool(loop.stop_reason))  # its own rule, not Tune's
        if not loop.is_main:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="montage-ckpt-", dir=self.staging) as tmp:
            save_checkpoint(loop.state_dict(), Path(tmp) / FILENAME)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def after_train(self, loop: Loop) -> None:
        import ray.train

        if not self.reported and loop.last_metrics:  # every rank: they all restored the same epoch
            metrics = {k: float(v) for k, v in loop.last_metrics.items()}
            ray.train.report({**metrics, "stopped_early": float(loop.should_stop and bool(loop.stop_reason))})


@contextlib.contextmanager
def _staging(cfg: ExperimentConfig, main: bool) -> Iterator[str | None]:
    """Where rank 0 keeps the best checkpoint for MLflow and writes each epoch's checkpoint before Ray
    copies it to storage: inside the run's own folder on local
    storage (a worker killed by a failure or by ASHA leaves nothing in /tmp; a rerun reuses it),
    a temporary folder for remote storage (what must outlive the worker is on the storage: checkpoints
    Ray uploads, the tracking outbox's mirror). Removed when the fit ends, by rank 0 only (the other
    ranks write no checkpoint, and one that ended first must not remove it under rank 0)."""
    if not main:
        yield None
        return
    run = Storage.of(cfg.run.storage, cfg.run.storage_endpoint).child(cfg.run.name)
    if run.remote:
        with tempfile.TemporaryDirectory(prefix="montage-best-") as tmp:
            yield tmp
        return
    folder = Path(run.uri) / ".montage-best"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sync_batchnorm(net: Any, cfg: ExperimentConfig, world: int) -> Any:
    """Batch norm over the global batch (``scaling.sync_batchnorm``; GPUs only in PyTorch)."""
    import torch

    if not cfg.scaling.sync_batchnorm or world == 1:
        return net
    if not (cfg.scaling.gpus and torch.cuda.is_available()):
        log.warning(
            "scaling.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel): batch norm stays per worker"
        )
        return net
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function every TorchTrainer worker runs."""
    import ray.train
    import ray.train.torch

    from montage.core.logs import setup_logging

    setup_logging(quiet_ray=True)
    cfg = config_from_tree(config["config"])
    resolve_model_sources(cfg)  # each worker fetches a models:/ teacher for itself (nodes share no disk)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    env = WorkerEnv(
        device=ray.train.torch.get_device(),
        rank=rank,
        world_size=world,
        wrap_model=lambda m: ray.train.torch.prepare_model(_sync_batchnorm(m, cfg, world), move_to_device=False),
        launched_at=config.get("launched_at"),
    )
    with _staging(cfg, rank == 0) as staging_dir:
        hooks = [*rank_hooks(cfg, rank, staging_dir, latest=False, tags=config.get("tags")), RayReportHook(staging_dir)]
        loop = build_loop(cfg, env, hooks)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                loop.load_state_dict(load_checkpoint(folder, task=cfg.task, model_config=to_dict(cfg.model)))
            if rank == 0:
                log.info("resumed at epoch %d (best %s=%s)", loop.epoch, loop.best.metric, loop.best.value)
        loop.fit()


def make_trainer(
    cfg: ExperimentConfig,
    callbacks: list[Any] | None = None,
    tags: dict[str, str] | None = None,
    launched_at: float | None = None,
) -> Any:
    """A configured ``TorchTrainer`` for ``cfg`` (name and storage already final).

    ``launched_at`` (``time.time()`` when the user's command or the Tune trial started) makes
    rank 0 report ``time/startup_s``, the seconds until its first train step."""
    import ray.train

    metric, mode = _monitor(cfg)
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.gpus:
        resources["GPU"] = sc.gpus_per_worker
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "tags": tags or {}, "launched_at": launched_at},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.workers, use_gpu=sc.gpus, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            **Storage.of(cfg.run.storage, cfg.run.storage_endpoint).ray_args(),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=sc.keep_checkpoints, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            callbacks=callbacks or [],
        ),
    )


@functools.cache
def _trainer_class() -> type:
    """``TorchTrainer`` without the Ray Data plumbing montage does not use.

    Ray Train 2.x starts a ``DatasetManager`` actor for every fit, datasets or not (its
    ``DatasetsCallback``): one more process that imports Ray Train (~2.5 s of CPU, and one of five
    processes a 1-worker fit starts). montage reads its data in the workers and passes no
    ``datasets``, so that callback is left out. Should a Ray release drop the hook overridden here,
    the plain trainer runs as before."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:  # another layout of Ray Train's internals: keep its default callbacks
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


def fit_ray(
    cfg: ExperimentConfig, resume: str | None = None, address: str | None = None, launched_at: float | None = None
) -> RunSummary:
    """Train ``cfg`` with a TorchTrainer of ``scaling.workers`` DDP workers.

    ``resume``: a run folder ``<storage>/<name>`` (or just a run name under ``run.storage``)
    to continue from its latest checkpoint. Returns a summary of the result.
    """
    ensure_ray(address)
    refuse_local_tracking_on_a_cluster(cfg)
    run = begin(cfg, resume)
    result, failure, restarts = fit_run(run, make_trainer(cfg, launched_at=launched_at or time.time()))
    error = _explain(failure, cfg, run.dir) if failure is not None else None
    if error:
        log.error("%s", error)
    metric = _monitor(cfg)[0]
    summary = RunSummary(
        run_dir=run.dir,
        metrics={},
        best_metric=metric,
        best_value=None,
        best_epoch=-1,
        best_checkpoint=None,
        mlflow_run_id=cfg.tracking.run_id or None,
        error=error,
        restarts=restarts,
    )
    if result is None:
        return summary
    best = result.get_best_checkpoint(*_monitor(cfg)) if result.best_checkpoints else None
    kept = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get("epoch", 0))
    best_metrics = dict(next((m for c, m in kept if best is not None and c.path == best.path), {}))
    summary.metrics = dict(result.metrics or {})
    summary.best_value, summary.best_epoch = best_metrics.get(metric), int(best_metrics.get("epoch", -1))
    summary.best_checkpoint = _uri(run, best.path) if best else None
    summary.checkpoint = _uri(run, result.checkpoint.path) if result.checkpoint else None
    summary.checkpoints = [KeptCheckpoint(_uri(run, c.path), dict(m)) for c, m in kept]
    return summary


def fit_run(run: Run, trainer: Any) -> tuple[Any, BaseException | None, int]:
    """Fit ``run``'s TorchTrainer and end the run, the same for a training and a Tune trial: Ray Train
    V2 raises once the restarts allowed (``scaling.max_failures``) are spent, and then the result is what
    the storage holds; a failure marks the MLflow run FAILED, an interrupt KILLED (re-raised), with the
    restarts counted (:meth:`Run.end`). Returns the result (None when nothing was stored), the failure
    and the restarts."""
    import ray.train

    try:
        result = trainer.fit()
        failure = result.error
    except ray.train.TrainingFailedError as exc:
        failure, result = exc, _stored_result(run)
    except KeyboardInterrupt as exc:
        run.end(exc)
        raise
    return result, failure, run.end(failure)


def _uri(run: Run, path: str) -> str:
    """A checkpoint path as Ray gives it (``bucket/prefix/...`` on object storage) as a URI."""
    if not run.storage.remote or "://" in path:
        return path
    return f"{run.storage.uri.split('://', 1)[0]}://{path}"


def _stored_result(run: Run) -> Any:
    """What a failed run left on storage (its kept checkpoints), or None."""
    import ray.train

    try:
        return ray.train.Result.from_path(run.storage.path, storage_filesystem=run.storage.filesystem)
    except Exception as exc:  # noqa: BLE001 - failed before its first report: nothing stored
        log.debug("no stored result at %s: %s", run.dir, exc)
        return None


def _explain(error: BaseException, cfg: ExperimentConfig, run_dir: str) -> str:
    """The error a failed fit returns: what failed on which rank, and what to do next."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        parts = []
        for rank, exc in sorted(failures.items()):
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            died = next((ln for ln in lines if "actor died" in ln.lower() or "worker exit detail" in ln.lower()), "")
            parts.append(f"rank {rank}: {type(exc).__name__}: {(died or (lines[-1] if lines else ''))[:300]}")
        detail = "; ".join(parts)
    else:
        detail = f"{type(error).__name__}: {str(error).strip()[:500]}"
    lost = any(s in detail.lower() for s in ("died", "unexpectedly", "actor", "connection error"))
    head = "a worker process was lost" if lost else "a worker raised"
    return (
        f"training failed: {head} ({detail}). scaling.max_failures={cfg.scaling.max_failures} restart(s) allowed; "
        f"continue from the latest checkpoint with --resume {run_dir}"
    )


def _monitor(cfg: ExperimentConfig) -> tuple[str, str]:
    from montage.core.registry import TASKS

    return TASKS.get(cfg.task).monitor
