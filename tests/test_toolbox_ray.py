"""K-fold cross-validation under Ray on the session's Ray: a sweep whose trial fits its folds at once and
reports, and is registered by, the cross-validated mean (segmentation smoke config, a few steps). ``montage
cv``'s own parallel folds: test_toolbox_cv.py."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from stores import mlflow_store

from montage.launch.tune import load_tune_config, run_sweep
from montage.platform.sampling import kfold_split
from montage.tracking import registry as reg
from montage.tracking.report import load_sweep

POOL = 32  # the smoke config's synthetic training samples: the folds split these


def history(client, run_id: str, key: str) -> dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [int(m.step) for m in points]
    assert len(steps) == len(set(steps)), f"{key} logged twice at one epoch: {steps}"
    return {int(m.step): m.value for m in points}


def nested(client, run) -> list:
    return client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")


def assert_disjoint_folds(folds: list, k: int) -> None:
    """The K fold runs validated the K folds of one seeded split, each once, together every sample."""
    assert sorted(int(f.data.params["cv.fold"]) for f in folds) == list(range(k))
    assert {(f.data.params["cv.folds"], f.data.params["cv.seed"]) for f in folds} == {(str(k), "0")}
    assert sum(f.data.metrics["val/samples"] for f in folds) == POOL
    vals = [set(kfold_split(POOL, k, int(f.data.params["cv.fold"]), 0)[1]) for f in folds]
    assert set.union(*vals) == set(range(POOL)) and sum(map(len, vals)) == POOL


def test_a_cv_sweep_reports_and_registers_the_cross_validated_mean(ray_session, tmp_path: Path, monkeypatch) -> None:
    """One trial of two folds (what is checked is what a trial tells Tune and what is registered; choosing
    the best of several trials by the sweep's metric is every sweep's: test_tune, test_report)."""
    uri = mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    path = tmp_path / "cv.yaml"
    space = {"optim.lr": {"type": "loguniform", "low": 0.001, "high": 0.01}}
    tune = {
        "task": "segmentation",
        "base": "segmentation-smoke",
        "overrides": [
            "train.epochs=2",
            "cv.folds=2",
            "tracking.log_model=false",
            f"tracking.artifacts={tmp_path / 'mlartifacts'}",
        ],
        "num_samples": 1,
        "search_space": space,
        "points_to_evaluate": [{"optim.lr": 0.003}],
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},  # the trial's 2 folds at once
        "storage": str(tmp_path / "tune"),
    }
    path.write_text(yaml.safe_dump(tune))
    tcfg, base, params = load_tune_config(path, ["name=cvsweep"])
    assert tcfg.metric == "cv/iou_mean" and tcfg.mode == "max"  # the task's monitor, cross-validated
    result = run_sweep(tcfg, base, params)
    assert len(result.table) == 1 and not result.errors

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["metric"] == "cv/iou_mean" and parent.data.params["trial.cv_folds"] == "2"
    trials = {r.data.tags["montage.trial"]: r for r in nested(client, parent)}
    assert set(trials) == {t.trial_id for t in result.table}  # one MLflow run per trial
    for t in result.table:
        run = trials[t.trial_id]
        folds = nested(client, run)
        assert sorted(f.info.run_name for f in folds) == ["fold0", "fold1"]
        assert_disjoint_folds(folds, 2)
        assert all(f.data.tags["montage.starts"] == "1" for f in folds)  # every fold trained once
        fold_iou = [history(client, f.info.run_id, "val/iou") for f in folds]
        mean, std = history(client, run.info.run_id, "cv/iou_mean"), history(client, run.info.run_id, "cv/iou_std")
        assert sorted(mean) == list(range(1, t.epochs + 1))  # one point per epoch every fold reached
        for epoch, value in mean.items():
            ious = [h[epoch] for h in fold_iou]
            assert value == pytest.approx(np.mean(ious)) and std[epoch] == pytest.approx(np.std(ious, ddof=1))
        # what Tune was told (the trial's last result) is that CV mean, and its best is the best epoch's
        assert t.metrics["cv/iou_mean"] == pytest.approx(mean[t.epochs])
        assert t.best("cv/iou_mean") == pytest.approx(max(mean.values()))

    # the registered version carries the trial's best CV mean and its best fold's checkpoint
    assert result.best.status.value == "finished"
    r = result.registered
    assert r.metric == "cv/iou_mean" and r.value == pytest.approx(result.best.best("cv/iou_mean"))
    version = reg.client(uri).get_model_version(reg.model_name("segmentation"), r.version)
    assert version.tags["montage.metric"] == "cv/iou_mean" and float(version.tags["montage.value"]) == r.value
    assert version.tags["montage.cv.folds"] == "2" and version.run_id == trials[result.best.trial_id].info.run_id
    fold_best = {
        int(f.data.params["cv.fold"]): max(history(client, f.info.run_id, "val/iou").values())
        for f in nested(client, trials[result.best.trial_id])
    }
    chosen = int(version.tags["montage.cv.fold"])
    assert float(version.tags["montage.cv.fold_value"]) == pytest.approx(fold_best[chosen]) == max(fold_best.values())

    # `montage report sweep` draws the CV mean of every trial
    data = load_sweep("cvsweep", uri)
    assert data.metric == "cv/iou_mean" and len(data.runs) == 1
    assert all(run.history.get("cv/iou_mean") for run in data.runs)
