"""Ray Tune + Optuna + ASHA sweeps over nested TorchTrainers, MLflow parent/child runs, the registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from stores import mlflow_store

from montage.core.config import ConfigError
from montage.core.sources import ModelSource
from montage.launch.session import Capacity
from montage.launch.tune import (
    TrialResources,
    TuneConfig,
    asha_max_t,
    load_tune_config,
    trial_concurrency,
)
from montage.launch.tune_results import best_trial, trial_status
from montage.platform.checkpoint import load_checkpoint
from montage.platform.runner import WorkerEnv, build_loop, config_from_tree
from montage.tracking import registry as st
from montage.tracking.sweeps import TrialRecord, TrialStatus


def write_tune(tmp_path: Path, name: str = "t.yaml", **extra) -> Path:
    cfg = {
        "task": "segmentation",
        "base": "segmentation-smoke",
        "overrides": ["train.epochs=2", f"tracking.artifacts={tmp_path / 'mlartifacts'}"],
        "num_samples": 2,
        "seed": 0,
        "search_space": {
            "loss.dice": {"type": "uniform", "low": 0.5, "high": 1.5},
            "optim.lr": {"type": "loguniform", "low": 0.001, "high": 0.01},
        },
        "points_to_evaluate": [{"loss.dice": 1.0, "optim.lr": 0.003}],
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
        "storage": str(tmp_path / "tune"),
        "max_concurrent": 2,
        **extra,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "space, message",
    [
        ({"loss.dyce": {"type": "uniform", "low": 0, "high": 1}}, "unknown config key 'loss.dyce'"),
        ({"loss.dice": {"type": "uniform", "low": 2, "high": 1}}, "low (2.0) must be < high (1.0)"),
        ({"loss.dice": {"type": "choice", "values": []}}, "non-empty 'values'"),
        ({"loss.dice": {"type": "gaussian", "low": 0, "high": 1}}, "unknown type 'gaussian'"),
        ({"optim.lr": {"type": "loguniform", "low": 0, "high": 1}}, "loguniform needs low > 0"),
        ({"train.batch_size": {"type": "uniform", "low": 2, "high": 8}}, "train.batch_size: expected int"),
        ({"optim.name": {"type": "choice", "values": ["adam", "lion"]}}, "'lion' is not one of"),
        ({}, "search_space is empty"),
    ],
)
def test_invalid_spaces_fail_before_any_trial(tmp_path: Path, space: dict, message: str) -> None:
    path = write_tune(tmp_path, search_space=space, points_to_evaluate=[])
    with pytest.raises(ConfigError) as err:
        load_tune_config(path)
    assert message in str(err.value)


def test_space_parsing_and_concurrency(tmp_path: Path) -> None:
    tcfg, base, params = load_tune_config(write_tune(tmp_path), ["num_samples=5", "base.train.epochs=3"])
    assert tcfg.num_samples == 5 and base.train.epochs == 3
    assert tcfg.metric == "val/iou" and tcfg.mode == "max"  # the task's monitor
    assert [(p.key, p.kind) for p in params] == [("loss.dice", "uniform"), ("optim.lr", "loguniform")]
    assert base.scaling.workers == 1 and base.scaling.cpus_per_worker == 0.5
    with pytest.raises(ConfigError, match="not in the search space"):
        load_tune_config(write_tune(tmp_path, points_to_evaluate=[{"loss.bce": 1.0}]))
    # resources are what a trial's TorchTrainer asks for, nothing else: a key that would do nothing is refused
    for key in ("max_failures", "keep_checkpoints", "sync_batchnorm"):
        with pytest.raises(ConfigError, match=f"unknown config key 'resources.{key}'"):
            load_tune_config(write_tune(tmp_path), [f"resources.{key}=1"])


def test_concurrency_comes_from_what_the_cluster_can_grow_to() -> None:
    def tune(**resources) -> TuneConfig:
        return TuneConfig(task="x", base="y", resources=TrialResources(**resources), num_samples=8)

    half = tune(workers=1, cpus_per_worker=0.5)
    assert trial_concurrency(half, Capacity([{"CPU": 2.0}], "of this cluster")) == 4  # 0.5 CPU a trial
    with pytest.raises(ConfigError, match="one trial needs 4 CPU"):
        trial_concurrency(tune(workers=4), Capacity([{"CPU": 2.0}], "of this cluster"))
    # a head with 0 CPUs and a worker type of 1 CPU, at most 2 of them: nothing fits now, 2 × 1 CPU later
    grows = Capacity([{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}], "type of the autoscaler", ["head", "cpu ×2"])
    assert trial_concurrency(half, grows) == 4
    assert trial_concurrency(tune(workers=2, cpus_per_worker=0.6), grows) == 1
    assert (
        trial_concurrency(
            TuneConfig(task="x", base="y", resources=TrialResources(cpus_per_worker=0.5), max_concurrent=2), grows
        )
        == 2
    )
    # a worker no node type can ever hold fails at once, naming the resource
    gpus = Capacity([{"CPU": 0.0}] + [{"CPU": 8.0, "GPU": 1.0}] * 4, "type of the autoscaler", ["gpu_worker"])
    assert trial_concurrency(tune(workers=2, gpus=True, cpus_per_worker=4), gpus) == 2
    with pytest.raises(ConfigError, match=r"no node type of the autoscaler can hold it .*not enough GPU"):
        trial_concurrency(tune(workers=1, gpus=True, gpus_per_worker=2), gpus)
    # a node type whose resources are not declared: never refused, as many as max_concurrent (else num_samples)
    undeclared = Capacity([{"CPU": 0.0}], "type of the autoscaler", ["head", "gpu_worker"], ["gpu_worker × 8"])
    assert trial_concurrency(tune(workers=1, gpus=True, gpus_per_worker=2), undeclared) == 8


def test_trial_status_says_stopped_early_only_for_the_schedulers_stops() -> None:
    finished, stopped = TrialStatus.FINISHED, TrialStatus.STOPPED
    assert trial_status(epochs=2, budget=2, stopped_itself=True, failed=False) is finished
    assert trial_status(epochs=2, budget=2, stopped_itself=False, failed=False) is finished  # ASHA ends trials at max_t
    # Tune marks a trial its scheduler stopped as done: only the loop's own early stop counts
    assert trial_status(epochs=1, budget=2, stopped_itself=False, failed=False) is stopped  # a scheduler's stop
    assert trial_status(epochs=3, budget=8, stopped_itself=True, failed=False) is finished  # the loop's own early stop
    assert trial_status(epochs=2, budget=2, stopped_itself=True, failed=True) is TrialStatus.FAILED


def test_asha_lets_a_trial_that_reaches_its_last_epoch_end_by_itself() -> None:
    # ASHA stops (ends the actor of) every trial that reports max_t: one past the last epoch, unless a
    # shorter max_t is asked for
    assert asha_max_t(0, 8) == 9 and asha_max_t(8, 8) == 9 and asha_max_t(20, 8) == 9
    assert asha_max_t(4, 8) == 4


def test_best_trial_is_chosen_among_trials_of_the_full_budget() -> None:
    def trial(name: str, value: float, epochs: int, status: TrialStatus, error: str = "") -> TrialRecord:
        return TrialRecord(name, name, {}, {"best/val/iou": value}, epochs, status, error)

    short = trial("short", 0.9, 1, TrialStatus.STOPPED)  # best of one epoch: not comparable
    full = [trial("a", 0.5, 4, TrialStatus.FINISHED), trial("b", 0.7, 4, TrialStatus.FINISHED)]
    failed = trial("failed", 0.99, 4, TrialStatus.FAILED, error="boom")
    assert best_trial([short, *full, failed], "val/iou", "max").name == "b"
    assert best_trial([short, *full], "val/iou", "min").name == "a"
    # no trial finished: the ones that got furthest compete
    assert best_trial([short, trial("two", 0.2, 2, TrialStatus.STOPPED)], "val/iou", "max").name == "two"
    assert best_trial([failed], "val/iou", "max") is None


def test_sweep_tracks_registers_and_promotes(harmonization_sweep, monkeypatch) -> None:
    """conftest's sweep (two harmonization trials, ASHA stopping the second) tracked, registered, promoted."""
    uri, result = harmonization_sweep.uri, harmonization_sweep.result
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert len(result.table) == 2 and not result.errors
    # trials stage their best checkpoint in their own run folder: even one ASHA stops leaves nothing in /tmp
    assert harmonization_sweep.staged_after == harmonization_sweep.staged_before
    assert all(0 < t.metrics["time/startup_s"] < 300 for t in result.table)  # trial start → first step
    assert result.table[0].params == {"loss.mse": 1.0, "optim.lr": 0.003}  # points_to_evaluate first

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["montage-harmonization"])
    parent = runs[runs["tags.montage.role"] == "sweep"]
    children = runs[runs["tags.mlflow.parentRunId"] == result.parent_run_id]
    assert len(parent) == 1 and len(children) == 2
    assert parent.iloc[0]["params.space.loss.mse"] == "uniform(0.5, 1.5)"
    assert set(children["tags.montage.trial_status"]) == {"finished", "stopped early"}
    assert children["metrics.val/fmse"].notna().all()
    client = mlflow.MlflowClient()
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "tune_config.yaml", "optuna"} <= parent_artifacts

    assert result.registered and result.registered.promoted and result.registered.version == "1"
    champ = st.champion("harmonization", uri)
    assert str(champ.version) == "1" and champ.tags["montage.metric"] == "val/fmse"
    # the champion's weights reproduce the best trial's val metric
    checkpoint = st.download_model_checkpoint(ModelSource.champion("harmonization"), uri)
    state = load_checkpoint(checkpoint, task="harmonization")
    cfg = config_from_tree(state["config"])
    cfg.tracking.enabled = False
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])
    loop.load_state_dict(state)
    assert loop.evaluate()["val/fmse"] == pytest.approx(float(champ.tags["montage.value"]), rel=1e-5)
    assert float(champ.tags["montage.value"]) == pytest.approx(result.best.best("val/fmse"))

    # a worse registration leaves the champion alone; promote by hand moves it (in a store of its own:
    # test_report reads the sweep's registry, version 1 alone)
    from montage.tracking.runs import create_run, prepare_tracking

    manual = harmonization_sweep.tmp / "manual"
    cfg.tracking.uri, cfg.tracking.artifacts = mlflow_store(manual), str(manual / "mlartifacts")
    cfg.tracking.parent_run_id = ""
    prepare_tracking(cfg)
    run_id = create_run(cfg)
    first = st.register_checkpoint(cfg, str(checkpoint), run_id, "val/fmse", "min", 300.0, "manual", {}, "better")
    worse = st.register_checkpoint(cfg, str(checkpoint), run_id, "val/fmse", "min", 400.0, "manual", {}, "better")
    assert first.promoted and worse.version == "2" and not worse.promoted
    assert str(st.champion("harmonization", cfg.tracking.uri).version) == "1"
    st.promote("harmonization", "2", cfg.tracking.uri)
    assert str(st.champion("harmonization", cfg.tracking.uri).version) == "2"
    assert [str(v.version) for v in st.list_versions("harmonization", cfg.tracking.uri)] == ["1", "2"]


def test_a_trial_ends_its_run_as_a_training_does(tmp_path: Path, monkeypatch) -> None:
    """Tune's trial function ends its run through fit_ray's code (``train.fit_run``): a training whose
    restarts are spent (Ray Train raises) marks the trial's MLflow run FAILED with the error, an interrupt
    KILLED, before the trial errs. Its workers may have died before they could say so, and the sweep's own
    summary of its trials comes only once every trial has ended, never when the sweep is interrupted.
    (The trial's TorchTrainer is a stand-in that fails at once: no Ray needed.)"""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from montage.core.config import to_dict
    from montage.launch import train, tune
    from montage.tracking.runs import get_experiment_id, prepare_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path))
    base = load_tune_config(write_tune(tmp_path))[1]
    prepare_tracking(base)
    client = mlflow.MlflowClient(base.tracking.uri)
    # the experiment as montage makes it, its artifacts under tmp_path (MLflow's default is ./mlruns: the repo)
    exp = get_experiment_id(client, base.tracking.experiment, base.tracking.artifacts, base.tracking.uri)
    assert client.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    parent = client.create_run(exp).info.run_id
    sweep = {"name": "fails", "parent_run_id": parent, "trials_storage": str(tmp_path / "tune" / "fails" / "trials")}

    class Trainer:
        def __init__(self, error: BaseException) -> None:
            self.error = error

        def fit(self):
            raise self.error

    class Context:
        def __init__(self, trial_id: str) -> None:
            self.get_trial_id = lambda: trial_id

    monkeypatch.setattr("ray.tune.integration.ray_train.TuneReportCallback", lambda: None)  # needs a Tune session
    lost = WorkerGroupError("rank 0: ImageError: image folder not found", {0: RuntimeError("image folder not found")})
    for trial_id, error, status in (("lost", lost, "FAILED"), ("stopped", KeyboardInterrupt(), "KILLED")):
        monkeypatch.setattr("ray.tune.get_context", lambda: Context(trial_id))
        monkeypatch.setattr(train, "make_trainer", lambda *args, **kwargs: Trainer(error))
        with pytest.raises(type(error)):
            tune._trial({"loss__dice": 1.0, "optim__lr": 0.003}, to_dict(base), sweep)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_run(parent).info.experiment_id])}
    assert runs["trial_lost"].info.status == "FAILED" and runs["trial_stopped"].info.status == "KILLED"
    assert "image folder not found" in runs["trial_lost"].data.tags["montage.error"]
    assert "KeyboardInterrupt" in runs["trial_stopped"].data.tags["montage.error"]
    assert all(runs[n].data.tags["mlflow.parentRunId"] == parent for n in ("trial_lost", "trial_stopped"))

    # the server gone since the sweep began: the trial trains, its worker opening its run with the trial's tags
    from cluster_helpers import free_port

    made: dict = {}

    class Fits:
        def fit(self):
            return type("Result", (), {"error": None})()

    away = to_dict(base)
    away["tracking"]["uri"] = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr("ray.tune.get_context", lambda: Context("away"))
    monkeypatch.setattr(train, "make_trainer", lambda cfg, **kwargs: made.update(kwargs) or Fits())
    tune._trial({"loss__dice": 1.0, "optim__lr": 0.003}, away, sweep)
    assert made["tags"] == {"montage.sweep": "fails", "montage.trial": "away"}


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parent.parent / "tune_configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_tune_configs_validate(path: Path) -> None:
    tcfg, base, params = load_tune_config(path)
    assert params and base.task == tcfg.task


def test_tune_overrides_start_from_the_defaults(tmp_path: Path) -> None:
    # a section the file leaves out can still be overridden key by key; unknown keys still name the valid ones
    path = write_tune(tmp_path)
    tree = yaml.safe_load(path.read_text())
    del tree["scheduler"], tree["resources"]
    path.write_text(yaml.safe_dump(tree))
    tcfg, base, _ = load_tune_config(path, ["scheduler.reduction_factor=3", "resources.cpus_per_worker=0.5"])
    assert tcfg.scheduler.reduction_factor == 3 and tcfg.scheduler.grace_period == 1
    assert tcfg.resources.cpus_per_worker == 0.5 and base.scaling.cpus_per_worker == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key .scheduler.grace. \(valid in scheduler: name, grace_"):
        load_tune_config(path, ["scheduler.grace=2"])
