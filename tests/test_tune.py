"""Ray Tune + Optuna + ASHA sweeps over nested TorchTrainers, MLflow parent/child runs, the registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from montage.core.config import ConfigError
from montage.launch.tune import TuneConfig, load_tune_config, run_sweep, trial_concurrency
from montage.platform.checkpoint import load_checkpoint
from montage.platform.runner import WorkerEnv, build_loop, config_from_tree
from montage.tracking import registry as st
from montage.tracking.sweeps import TrialStatus


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
    assert trial_concurrency(TuneConfig(task="x", base="y", resources=tcfg.resources), {"CPU": 2.0}) == 3
    with pytest.raises(ConfigError, match="one trial needs 4.01 CPUs"):
        trial_concurrency(TuneConfig(task="x", base="y", resources=type(tcfg.resources)(workers=4)), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="not in the search space"):
        load_tune_config(write_tune(tmp_path, points_to_evaluate=[{"loss.bce": 1.0}]))


def test_sweep_tracks_registers_and_promotes(ray_session, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    tcfg, base, params = load_tune_config(write_tune(tmp_path), ["name=sw"])
    staged = {p.name for p in Path(tempfile.gettempdir()).glob("montage-best-*")}
    result = run_sweep(tcfg, base, params)
    assert len(result.table) == 2 and not result.errors
    # trials stage their best checkpoint in their own run folder: even one ASHA stops leaves nothing in /tmp
    assert {p.name for p in Path(tempfile.gettempdir()).glob("montage-best-*")} == staged
    assert all(0 < t.metrics["time/startup_s"] < 300 for t in result.table)  # trial start → first step
    assert result.table[0].params == {"loss.dice": 1.0, "optim.lr": 0.003}  # points_to_evaluate first

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["montage-segmentation"])
    parent = runs[runs["tags.montage.role"] == "sweep"]
    children = runs[runs["tags.mlflow.parentRunId"] == result.parent_run_id]
    assert len(parent) == 1 and len(children) == 2
    assert parent.iloc[0]["params.space.loss.dice"] == "uniform(0.5, 1.5)"
    assert set(children["tags.montage.trial_status"]) <= {"finished", "stopped early"}
    assert children["metrics.val/iou"].notna().all()
    client = mlflow.MlflowClient()
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "tune_config.yaml", "optuna"} <= parent_artifacts

    assert result.registered and result.registered.promoted and result.registered.version == "1"
    champ = st.champion("segmentation")
    assert str(champ.version) == "1" and champ.tags["montage.metric"] == "val/iou"
    # the champion's weights reproduce the best trial's val metric
    state = load_checkpoint(st.download_model_checkpoint("segmentation"), task="segmentation")
    cfg = config_from_tree(state["config"])
    cfg.tracking.enabled = False
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])
    loop.load_state_dict(state)
    assert loop.evaluate()["val/iou"] == pytest.approx(float(champ.tags["montage.value"]), abs=1e-5)
    assert float(champ.tags["montage.value"]) == pytest.approx(result.best.best("val/iou"))

    # a worse registration leaves the champion alone; promote by hand moves it
    reg = st.register_checkpoint(base, result.best.checkpoint, result.best.mlflow_run_id, "val/iou", "max", 0.0, "manual", {}, "better")
    assert reg.version == "2" and not reg.promoted
    assert str(st.champion("segmentation").version) == "1"
    st.promote("segmentation", "2")
    assert str(st.champion("segmentation").version) == "2"
    assert [str(v.version) for v in st.list_versions("segmentation")] == ["1", "2"]


def test_interrupted_sweep_resumes_without_duplicate_runs(ray_session, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    path = write_tune(tmp_path, max_concurrent=1, num_samples=2, scheduler={"name": "none"})
    cmd = [sys.executable, "-m", "montage.cli", "tune", str(path), "name=intr", "--promote", "never"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "tune" / "intr" / "trials"
    deadline = time.time() + 180
    while time.time() < deadline and not list(trials.glob("*/checkpoint_*")):
        time.sleep(1)
    assert list(trials.glob("*/checkpoint_*")), "the first trial never checkpointed"
    proc.send_signal(signal.SIGINT)  # Tune saves its state and stops
    proc.wait(timeout=120)

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        tcfg, base, params = load_tune_config(path, ["name=intr", "promote=never"])
        result = run_sweep(tcfg, base, params, resume=True)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert len(result.table) == 2 and not result.errors
    # the trial that never started before the interrupt ran on resume; the interrupted one was
    # resumed or, when Tune had already recorded it as stopped, kept with its epochs
    assert sum(t.status is TrialStatus.FINISHED for t in result.table) >= 1, result.table
    assert all(t.epochs >= 1 for t in result.table), result.table
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["montage-segmentation"])
    assert (runs["tags.montage.role"] == "sweep").sum() == 1  # the same parent run
    children = runs[runs["tags.mlflow.parentRunId"] == result.parent_run_id]
    assert len(children) == 2 and children["tags.montage.trial"].nunique() == 2  # no duplicates


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "tune_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_tune_configs_validate(path: Path) -> None:
    tcfg, base, params = load_tune_config(path)
    assert params and base.task == tcfg.task
