"""Ray Tune adapter: Optuna search + ASHA over any config key, one multi-worker
TorchTrainer per trial, an MLflow parent run per sweep with a child run per trial, and the
best checkpoint registered (and promoted) in the MLflow model registry.

A tune config (``tune_configs/*.yaml``) names the task, a base training config, the
search space and the sweep's settings; its sections are :mod:`montage.core.tune_sections`
(re-exported here), :func:`~montage.launch.tune_space.load_tune_config` reads and validates
one. With ``cv.folds=K`` in the base, each trial fits K folds and reports their mean
(:mod:`montage.launch.tune_cv`).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from montage.core import schema
from montage.core.config import ConfigError, ExperimentConfig, set_dotted, to_dict
from montage.core.tune_sections import (  # noqa: F401  (SchedulerConfig, TrialResources: re-exported)
    SchedulerConfig,
    TrialResources,
    TuneConfig,
)
from montage.launch.session import Capacity
from montage.launch.tune_cv import best_fold_checkpoint, cv_trial, fits_at_once
from montage.launch.tune_results import (
    best_checkpoint,
    best_trial,
    trial_status,
    trials_ended,
    trials_ended_before,
)
from montage.launch.tune_space import Param, load_tune_config, parse_space  # noqa: F401  (re-exported)
from montage.tracking.registry import Registration
from montage.tracking.sweeps import TrialRecord

log = logging.getLogger(__name__)

# Where each trial's own function runs: on the head, a hundredth of Ray's built-in head-node resource and
# no CPU (the head of cluster.yaml has none to give). It only waits on its TorchTrainer, whose controller it
# starts beside itself; on a worker node it would be lost with that node, and Ray Train's detached
# autoscaling coordinator, created on the controller's node, would keep that node from ever being idle.
TRIAL_FUNCTION_RESOURCES = {"node:__internal_head__": 0.01}


def trial_concurrency(tcfg: TuneConfig, capacity: Capacity, fits: int = 1) -> int:
    """How many trials the cluster can run at once once it has grown (an autoscaler's node types, or
    the nodes of a fixed cluster), capped by ``max_concurrent``; a trial runs ``fits`` TorchTrainer fits at
    once (its K folds under ``cv.folds=K``) and asks for that many fits' resources. Fails at once, naming
    the resource, when no node could ever host one of a trial's workers, or the whole cluster one trial. A
    cluster with node types whose resources are not declared (``resources: {}``: Ray learns them when such
    a node starts) is never refused: up to ``max_concurrent`` (else ``num_samples``) trials at once."""
    r = tcfg.resources
    bundle, demand = r.bundle(), {k: v * fits for k, v in r.demand().items()}
    if not capacity.known:
        fit = tcfg.max_concurrent or tcfg.num_samples
        log.warning(
            "the resources of node type(s) %s are not declared in the autoscaler's config (Ray learns them when "
            "such a node starts): up to %d trial(s) at once; set max_concurrent to choose, or declare the node "
            "type's resources (e.g. resources: {CPU: 8, GPU: 1}) to size it from them",
            ", ".join(capacity.undeclared),
            fit,
        )
        return fit
    if not any(_fits(bundle, node) for node in capacity.nodes):
        short = [k for k in sorted(bundle) if not any(node.get(k, 0) + 1e-9 >= bundle[k] for node in capacity.nodes)]
        short = short or sorted(bundle)  # each fits somewhere, never together
        raise ConfigError(
            f"one trial worker needs {_fmt_res(bundle)} but no node {capacity.kind} can hold it "
            f"({'; '.join(capacity.describe()) or 'no nodes'}): not enough {', '.join(short)} — lower "
            "resources.cpus_per_worker / gpus_per_worker, or add a node type that has them"
        )
    total = capacity.total
    fit = min(math.floor(total.get(k, 0) / v + 1e-9) for k, v in demand.items())
    if fit < 1:
        folds = f" ({fits} folds at once; cv.parallel=false fits them one after another)" if fits > 1 else ""
        raise ConfigError(
            f"one trial needs {_fmt_res(demand)}{folds} but the cluster {capacity.kind} has {_fmt_res(total)} in "
            "all: lower resources.workers / cpus_per_worker"
        )
    return min(fit, tcfg.max_concurrent) if tcfg.max_concurrent else fit


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) + 1e-9 >= v for k, v in bundle.items())


def _fmt_res(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items())) or "nothing"


def asha_max_t(max_t: int, epochs: int) -> int:
    """ASHA's ``max_t`` for a sweep whose trials train ``epochs`` epochs (``max_t`` 0: the epochs).

    One past the last epoch unless ``max_t`` cuts trials shorter: ASHA stops every trial that reports
    ``max_t``, and a stopped trial's actor is ended with its Ray Train controller before that shuts
    down, so the controller never withdraws the resources it asked the autoscaler for; the request
    stands until it expires (180 s in Ray 2.60) and keeps the trial's worker node from being idle. A
    trial that reaches its last epoch below ``max_t`` returns and shuts its training down itself. The
    rungs below the last epoch are the same either way (a rung at the last epoch can appear, where a
    trial is compared once its training is done)."""
    budget = max_t or epochs
    return budget if budget < epochs else epochs + 1


def trial_name(trial_id: str) -> str:
    """Short, stable names: the Tune trial folder, its TorchTrainer run and its MLflow run."""
    return f"trial_{trial_id}"


def _trial_label(trial: Any) -> str:
    return trial_name(trial.trial_id)


def _trial(config: dict[str, Any], base_tree: dict[str, Any], sweep: dict[str, str]) -> None:
    """The Tune trial: one TorchTrainer whose workers report to Tune via TuneReportCallback."""
    started = time.time()
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from montage.core.logs import setup_logging
    from montage.launch.lifecycle import begin
    from montage.launch.train import fit_run, make_trainer
    from montage.platform.runner import config_from_tree

    setup_logging()
    tree = copy.deepcopy(base_tree)
    for safe, value in config.items():
        set_dotted(tree, safe.replace("__", "."), value)
    ctx = ray.tune.get_context()
    tree["run"]["name"] = trial_name(ctx.get_trial_id())
    tree["run"]["storage"] = sweep["trials_storage"]
    tree["tracking"]["parent_run_id"] = sweep["parent_run_id"]
    cfg = config_from_tree(tree)
    # one MLflow run per trial, found again under the sweep's parent when Tune restores the trial
    tags = {schema.SWEEP: sweep["name"], schema.TRIAL: ctx.get_trial_id()}
    if cfg.cv.folds:
        cv_trial(cfg, tags, started)
        return
    run = begin(cfg, tags=tags, trial=True)
    trainer = make_trainer(cfg, callbacks=[TuneReportCallback()], tags=tags, launched_at=started)
    _, failure, _ = fit_run(run, trainer)
    if failure is not None:  # the trial errs (Tune's max_failures may run it again from its checkpoint)
        raise failure


class SweepInterrupted(RuntimeError):
    """The sweep stopped (Ctrl-C / SIGINT) before every trial ended; Tune saved its state."""


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    table: list[TrialRecord]
    best: TrialRecord | None
    registered: Registration | None
    errors: list[str]


def run_sweep(
    tcfg: TuneConfig, base: ExperimentConfig, params: list[Param], resume: bool = False, address: str | None = None
) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from montage.launch.session import cluster_capacity, ensure_ray, refuse_local_tracking_on_a_cluster
    from montage.launch.storage import Storage
    from montage.tracking import sweeps as st
    from montage.tracking.runs import TrackingUnavailable, prepare_tracking, tracking_down

    if resume and not tcfg.name:
        raise ConfigError("--resume needs the sweep's name= (its folder under storage)")
    tcfg.name = tcfg.name or f"{tcfg.task}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Storage.of(tcfg.storage, tcfg.storage_endpoint)
    root.check()  # a missing bucket or refused credentials: now, not in the first trial
    sweep_storage = root.child(tcfg.name)
    sweep_dir = sweep_storage.uri
    prepare_tracking(base)
    down = tracking_down(base)
    if down is not None:
        raise TrackingUnavailable(
            f"MLflow tracking server {base.tracking.uri} does not answer ({down}). A sweep compares its trials in "
            "MLflow, so its server must answer at the start, whatever tracking.required says (that is for single "
            "trainings); trials that lose it later queue their records and go on. Start it (on a cluster: "
            "`mlflow server` on the head, as cluster.yaml does)"
        )
    ensure_ray(address)
    refuse_local_tracking_on_a_cluster(base)
    concurrency = trial_concurrency(tcfg, cluster_capacity(), fits_at_once(base))
    parent_id = st.parent_run(base, tcfg, params, sweep_dir, resume)
    log.info(
        "sweep %s: %d trials, %d at a time, metric %s (%s); MLflow parent run %s",
        tcfg.name,
        tcfg.num_samples,
        concurrency,
        tcfg.metric,
        tcfg.mode,
        parent_id,
    )

    sweep = {"name": tcfg.name, "parent_run_id": parent_id, "trials_storage": sweep_storage.child("trials").uri}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base_tree=to_dict(base), sweep=sweep), TRIAL_FUNCTION_RESOURCES
    )
    ended_before: set[str] = set()
    if resume:
        where = {"path": sweep_storage.path, "storage_filesystem": sweep_storage.filesystem}
        if not tune.Tuner.can_restore(**where):
            raise FileNotFoundError(f"no sweep to resume at {sweep_dir}")
        ended_before = trials_ended_before(sweep_storage.path, sweep_storage.filesystem)
        tuner = tune.Tuner.restore(**where, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        points = [
            {next(p.safe for p in params if p.key == k): v for k, v in pt.items()} for pt in tcfg.points_to_evaluate
        ]
        searcher = ConcurrencyLimiter(
            OptunaSearch(metric=tcfg.metric, mode=tcfg.mode, seed=tcfg.seed, points_to_evaluate=points or None),
            max_concurrent=concurrency,
        )
        s = tcfg.scheduler
        scheduler = (
            ASHAScheduler(
                # the epoch, not Tune's training_iteration: a resumed trial restarts its iteration count at 1
                # (its checkpoints are its TorchTrainer's, not Tune's) while its epochs go on
                time_attr="epoch",
                max_t=asha_max_t(s.max_t, base.train.epochs),
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
            )
            if s.name == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space={p.safe: p.domain() for p in params},
            tune_config=tune.TuneConfig(
                metric=tcfg.metric,
                mode=tcfg.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=tcfg.num_samples,
                trial_name_creator=_trial_label,
                trial_dirname_creator=_trial_label,
            ),
            run_config=tune.RunConfig(
                name=tcfg.name,
                **root.ray_args(),
                failure_config=tune.FailureConfig(max_failures=tcfg.max_failures),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    ended = trials_ended(grid, ended_before)
    if ended < tcfg.num_samples:  # Tune returns early on SIGINT, its state saved: nothing is registered
        st.interrupt_sweep(base, parent_id, f"{ended} of {tcfg.num_samples} trials ended")
        raise SweepInterrupted(
            f"sweep {tcfg.name} interrupted: {ended} of {tcfg.num_samples} trials ended, its state is saved in "
            f"{sweep_dir}; "
            f"continue it with: montage tune <config> name={tcfg.name} --resume"
        )
    trials = _collect(grid, params, base)
    best = best_trial(trials, tcfg.metric, tcfg.mode)
    version_tags: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="montage-best-") as local:
        if best is not None:  # registered from a local copy when trials live on object storage
            folder = sweep_storage.child("trials", best.name)
            if base.cv.folds:  # its best fold's best checkpoint, with the trial's CV mean as the version's value
                best.checkpoint, version_tags = best_fold_checkpoint(folder, base, local)
            else:
                best.checkpoint = best_checkpoint(folder, tcfg.metric, tcfg.mode, local)[0]
        registered = st.finish_sweep(trials, best, tcfg, base, params, parent_id, version_tags)
    errors = [t.error for t in trials if t.error]
    return SweepResult(tcfg.name, parent_id, trials, best, registered, errors)


def _collect(grid: Any, params: list[Param], base: ExperimentConfig) -> list[TrialRecord]:
    """Ray's ResultGrid → trial records: params, final metrics, status."""
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id", "")
        epochs = int(m.get("epoch", 0) or 0)
        status = trial_status(epochs, base.train.epochs, bool(m.get("stopped_early")), r.error is not None)
        rows.append(
            TrialRecord(
                trial_id=trial_id,
                name=trial_name(trial_id),
                params={p.key: (r.config or {}).get(p.safe) for p in params},
                metrics={k: v for k, v in m.items() if isinstance(v, (int, float)) and ("/" in k or k == "epoch")},
                epochs=epochs,
                status=status,
                error=f"{type(r.error).__name__}: {r.error}" if r.error is not None else "",
            )
        )
    return rows
