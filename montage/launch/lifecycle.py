"""One run lifecycle for every launcher: in this process (:mod:`montage.launch.local`), a Ray
Train fit (:mod:`montage.launch.train`) and a Tune trial (:mod:`montage.launch.tune`).

A run is ``<run.storage>/<run.name>``. Before any worker starts, :func:`begin` names the run,
checks its storage (a missing bucket or refused credentials fail here), checks that a fresh run
does not overwrite a folder and that a resumed one exists, resolves the tracking URI and opens
(or finds again) the run's MLflow run, so restarts and resumes keep one record. In the workers,
:func:`rank_hooks` gives rank 0 its checkpoint files and the MLflow hook. When the fit returns,
:meth:`Run.end` counts the restarts and marks a failed run FAILED (its workers may have died
before they could say so). The failure, storage and tracking rules live here once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from montage.core.config import ExperimentConfig
from montage.launch.storage import Storage, StorageMirror
from montage.platform.hooks import CheckpointHook
from montage.platform.loop import Hook
from montage.platform.runner import default_run_name
from montage.tracking.outbox import OUTBOX, unreachable
from montage.tracking.run_hook import MlflowHook
from montage.tracking.runs import (
    end_failed_run,
    open_run,
    prepare_tracking,
    starts,
    tracking_answers,
    tracking_down,
)

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A run about to train: its config (name, storage and MLflow run id final), where it lives."""

    cfg: ExperimentConfig
    storage: Storage  # <run.storage>/<run.name>
    resumed: bool
    starts_before: int = 0  # trainings started in its MLflow run before this launch

    @property
    def dir(self) -> str:
        return self.storage.uri

    def end(self, failure: BaseException | str | None) -> int:
        """After the fit: the worker-group restarts it took (Ray's FailureConfig); a failure marks
        the MLflow run FAILED (KILLED for an interrupt) with the error."""
        if not self.cfg.tracking.enabled or not self.cfg.tracking.run_id:
            return 0
        try:
            restarts = max(0, starts(self.cfg, self.cfg.tracking.run_id) - self.starts_before - 1)
            if failure is not None:
                end_failed_run(self.cfg, self.cfg.tracking.run_id, failure)
        except Exception as exc:  # noqa: BLE001 - the fit's outcome stands without its tracking server
            if not unreachable(exc):
                raise
            log.warning("MLflow at %s does not answer: restarts of %s not counted (%s)", self.cfg.tracking.uri,
                        self.cfg.run.name, str(exc).splitlines()[0][:200])  # fmt: skip
            return 0
        if restarts:
            log.warning(
                "%s: the workers restarted %d time(s) from the latest checkpoint after failures "
                "(scaling.max_failures=%d)",
                self.cfg.run.name,
                restarts,
                self.cfg.scaling.max_failures,
            )
        return restarts


def resume_target(cfg: ExperimentConfig, resume: str | Path) -> None:
    """Point ``cfg.run`` at the run ``resume`` names: its folder ``<storage>/<name>`` (local or
    ``s3://``), a checkpoint file inside it, or just a name under ``run.storage``."""
    text = str(resume).rstrip("/")
    if "://" not in text and Path(text).is_file():
        text = str(Path(text).resolve().parent)
    if "/" in text:
        cfg.run.storage, cfg.run.name = text.rsplit("/", 1)
    else:
        cfg.run.name = text


def begin(
    cfg: ExperimentConfig,
    resume: str | Path | None = None,
    tags: dict[str, str] | None = None,
    trial: bool = False,
) -> Run:
    """Driver side, before any worker starts: name, storage, folder and tracking checks, and the
    MLflow run. ``trial``: a Tune trial, whose folder may exist when Tune restores it (its MLflow run
    is found again under the sweep's parent run)."""
    if resume:
        resume_target(cfg, resume)
    named = bool(cfg.run.name)
    cfg.run.name = default_run_name(cfg)
    root = Storage.of(cfg.run.storage, cfg.run.storage_endpoint)
    root.check()
    cfg.run.storage = root.uri
    storage = root.child(cfg.run.name)
    if not (named or resume or trial):  # a default name (<task>-<time>) taken by a run started in the same second
        stem, n = cfg.run.name, 2
        while storage.exists():
            cfg.run.name, n = f"{stem}-{n}", n + 1
            storage = root.child(cfg.run.name)
    if not trial:
        if resume and not storage.exists():
            raise FileNotFoundError(f"nothing to resume: run folder {storage} does not exist")
        if not resume and storage.exists():
            raise FileExistsError(
                f"run folder {storage} exists: pass --resume {storage} to continue it, or choose another run.name"
            )
    started = 0
    if cfg.tracking.enabled:
        prepare_tracking(cfg)
        if _answers(cfg, trial):
            cfg.tracking.run_id = open_run(cfg, storage.uri, tags=tags, resume=bool(resume))
            started = starts(cfg, cfg.tracking.run_id)
    return Run(cfg, storage, bool(resume), started)


def _answers(cfg: ExperimentConfig, trial: bool) -> bool:
    """Whether the tracking server answers now. A training's own start may refuse a server that does not
    (``tracking.required``); a trial's never does: its sweep found the server at its start, and a trial that
    starts while it is away trains like one that lost it, its worker opening its MLflow run (with the
    trial's tags) once the server is back."""
    if not trial:
        return tracking_answers(cfg)
    down = tracking_down(cfg)
    if down is not None:
        log.warning("MLflow at %s does not answer (%s): trial %s trains and sends its records once it is back",
                    cfg.tracking.uri, down, cfg.run.name)  # fmt: skip
    return down is None


def rank_hooks(
    cfg: ExperimentConfig,
    rank: int,
    folder: str | Path | None,
    latest: bool,
    tags: dict[str, str] | None = None,
) -> list[Hook]:
    """Rank 0's hooks: checkpoint files in ``folder`` (``latest.pt`` too when ``latest``; every
    ``train.checkpoint_every`` epochs) and, when tracking is on, the MLflow hook. Its outbox (what the
    tracking server could not take yet) lives in the run folder, which outlives this worker and this run:
    on a local (shared) disk directly; on object storage as a mirror of a working copy in ``folder``
    (nodes share no disk: a restart on another node, or a resume, finds it only there)."""
    if rank != 0:
        return []
    files = CheckpointHook(folder, latest=latest, every=cfg.train.checkpoint_every if latest else 0)
    hooks: list[Hook] = [files]
    if cfg.tracking.enabled:
        run_dir = Storage.of(cfg.run.storage, cfg.run.storage_endpoint).child(cfg.run.name)
        if run_dir.remote:
            mirror = StorageMirror(run_dir.child(OUTBOX))
            hook = MlflowHook(cfg, tags=tags, best_path=files.best_path, outbox_dir=folder, outbox_mirror=mirror)
        else:
            hook = MlflowHook(cfg, tags=tags, best_path=files.best_path, outbox_dir=run_dir.uri)
        hooks.append(hook)
    return hooks
