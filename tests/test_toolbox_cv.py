"""K-fold cross-validation in this process (no Ray): the folds, ``montage cv``'s parent run, and what a
cross-validated sweep reports and asks for (its Ray runs: ``test_toolbox_ray.py``)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from stores import mlflow_store
from toolbox_task import one_thread, pic_cfg, search  # noqa: F401  (one_thread: the module's fixture)

from montage.launch.cv import run_cv
from montage.platform.runner import fold_datasets, make_task
from montage.platform.sampling import kfold_split

# ------------------------------------------------------------------------------ K-fold


def test_kfold_folds_are_disjoint_and_cover_the_data() -> None:
    for n, k in [(10, 3), (7, 7), (100, 5)]:
        vals = [kfold_split(n, k, f, seed=4)[1] for f in range(k)]
        assert sorted(i for v in vals for i in v) == list(range(n))
        for f in range(k):
            train, val = kfold_split(n, k, f, seed=4)
            assert not set(train) & set(val) and len(train) + len(val) == n
        assert max(map(len, vals)) - min(map(len, vals)) <= 1
    assert kfold_split(10, 3, 0, 1) != kfold_split(10, 3, 0, 2)
    with pytest.raises(ValueError, match="too few"):
        kfold_split(2, 3, 0, 0)


@pytest.mark.parametrize("on_ray", [False, True], ids=["in-process", "ray-parallel"])
def test_cross_validation_runs_k_fits_under_one_parent_with_mean_and_std(tmp_path: Path, monkeypatch, on_ray) -> None:
    """K folds, each validated on its own share, under one parent run with their mean ± std. On Ray with
    cv.parallel (the default, ``montage cv``'s), the driver joins the cluster at the address it was given and
    starts the K folds' fits together, from K threads, not one after another. The fits here are this
    process's (a fold's Ray fit is ``fit_ray``, the same as every training's; test_toolbox_ray's
    cross-validated sweep runs a trial's folds as Ray fits at once)."""
    import threading

    from montage.launch import session, train
    from montage.launch.local import fit_local

    uri = mlflow_store(tmp_path)
    cfg = pic_cfg(tmp_path, "cv.folds=3", "train.epochs=1", "tracking.enabled=true", f"tracking.uri={uri}")
    cfg.tracking.artifacts = str(tmp_path / "art")
    task = make_task(pic_cfg(tmp_path, "cv.folds=3", "cv.fold=1"))
    train_set, val = fold_datasets(task)
    assert len(train_set) + len(val) == 24 and not set(train_set.indices) & set(val.indices)

    joined: list = []
    started = threading.Barrier(3, timeout=30)  # a fit that starts alone breaks it: BrokenBarrierError
    one_at_a_time, threads = threading.Lock(), set()

    def fit_ray(c, launched_at=None):
        threads.add(threading.current_thread().name)
        started.wait()
        with one_at_a_time:
            return fit_local(c, launched_at=launched_at)

    if on_ray:
        monkeypatch.setattr(session, "ensure_ray", joined.append)
        monkeypatch.setattr(train, "fit_ray", fit_ray)
        result = run_cv(cfg, use_ray=True, address="ray://head:10001")
        assert joined == ["ray://head:10001"]
        assert len(threads) == 3 and all(t.startswith("cv-fold") for t in threads)
    else:
        result = run_cv(cfg, use_ray=False)
    assert result.error is None and len(result.folds) == 3
    # each sample validated exactly once, 8 per fold
    assert sorted(s.metrics["val/samples"] for s in result.folds) == [8, 8, 8]
    per_fold = [s.best_metrics["val/mse"] for s in result.folds]
    assert result.mean["val/mse"] == pytest.approx(np.mean(per_fold))
    assert result.std["val/mse"] == pytest.approx(np.std(per_fold, ddof=1)) and result.std["val/mse"] > 0
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["cv/mse_mean"] == pytest.approx(result.mean["val/mse"])
    assert parent.data.metrics["cv/mse_std"] == pytest.approx(result.std["val/mse"])
    assert len(search(uri, f"tags.mlflow.parentRunId = '{result.parent_run_id}'")) == 3


def test_fold_curves_report_an_epoch_once_every_fold_reached_it() -> None:
    from montage.launch.tune_cv import FoldCurves

    curves = FoldCurves(3, "val/iou", "max")
    assert curves.add(0, {"epoch": 1, "val/iou": 0.2, "train/total": 1.0}) == []
    assert curves.add(1, {"epoch": 1, "val/iou": 0.4}) == []
    assert curves.add(0, {"epoch": 2, "val/iou": 0.1}) == []  # fold 0 ahead: waits for the others
    (one,) = curves.add(2, {"epoch": 1, "val/iou": 0.6})
    assert one["epoch"] == 1 and one["cv/iou_mean"] == pytest.approx(0.4)
    assert one["cv/iou_std"] == pytest.approx(np.std([0.2, 0.4, 0.6], ddof=1)) and "cv/total_mean" not in one
    assert one["best/cv/iou_mean"] == pytest.approx(0.4) and one["stopped_early"] == 0.0
    curves.add(1, {"epoch": 2, "val/iou": 0.2})
    (two,) = curves.add(2, {"epoch": 2, "val/iou": 0.3, "stopped_early": 1.0})
    assert two["cv/iou_mean"] == pytest.approx(0.2) and two["best/cv/iou_mean"] == pytest.approx(0.4)
    assert two["cv/best_epoch"] == 1 and two["best/cv/iou_std"] == one["cv/iou_std"] and two["stopped_early"] == 1.0
    assert curves.add(2, {"epoch": 2, "val/iou": 0.3}) == []  # re-reported after a resume: not again
    # a resumed trial whose folds restart at different epochs: the first epoch they all reach
    resumed = FoldCurves(2, "val/loss", "min")
    assert resumed.add(0, {"epoch": 4, "val/loss": 1.0}) == [] and resumed.add(1, {"epoch": 3, "val/loss": 2.0}) == []
    (four,) = resumed.add(1, {"epoch": 4, "val/loss": 3.0})
    assert four["epoch"] == 4 and four["best/cv/loss_mean"] == 2.0 and resumed.pending == {}


def test_a_cv_sweep_names_its_metric_and_asks_for_its_folds(tmp_path: Path) -> None:
    import yaml

    from montage.core.config import ConfigError
    from montage.core.tune_sections import TrialResources, TuneConfig
    from montage.launch.session import Capacity
    from montage.launch.tune import load_tune_config, trial_concurrency

    path = tmp_path / "t.yaml"
    space = {"optim.lr": {"type": "loguniform", "low": 0.001, "high": 0.01}}
    path.write_text(yaml.safe_dump({"task": "segmentation", "base": "segmentation-smoke", "search_space": space}))
    assert load_tune_config(path, ["base.cv.folds=3"])[0].metric == "cv/iou_mean"
    assert load_tune_config(path)[0].metric == "val/iou"
    with pytest.raises(ConfigError, match="set metric: cv/iou_mean"):
        load_tune_config(path, ["base.cv.folds=3", "metric=val/iou"])
    with pytest.raises(ConfigError, match="set cv.folds=K"):
        load_tune_config(path, ["metric=cv/iou_mean"])
    tcfg = TuneConfig(task="x", base="y", resources=TrialResources(cpus_per_worker=0.5), num_samples=8)
    two = Capacity([{"CPU": 2.0}], "of this cluster")
    assert trial_concurrency(tcfg, two) == 4 and trial_concurrency(tcfg, two, fits=2) == 2
    with pytest.raises(ConfigError, match=r"one trial needs 2.5 CPU \(5 folds at once; cv.parallel=false"):
        trial_concurrency(tcfg, two, fits=5)
