"""Interrupted sweeps: what Tune says of a trial stopped by SIGINT or restored from a saved sweep, and
``montage tune --resume`` after SIGKILL and SIGINT running its trial to its end, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from stores import mlflow_store
from test_tune import write_tune

from montage.cli import main
from montage.launch.tune_results import trials_ended, trials_ended_before


def _trial_dirs(trials: Path) -> list[Path]:
    return sorted((p for p in trials.glob("trial_*") if p.is_dir()), key=lambda p: p.stat().st_ctime)


def _trainable(fn):
    from ray import tune

    return tune.with_resources(fn, {"cpu": 0.01})  # a tiny CPU reservation, as montage's trials have


def _tuner(fn, tmp_path: Path, name: str, **space):
    """A plain Tune experiment of one trial of ``fn`` saved under tmp_path."""
    from ray import tune

    return tune.Tuner(
        _trainable(fn),
        param_space=space,
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0),
    )


def test_a_trial_stopped_by_the_interrupt_has_not_ended(ray_session, tmp_path: Path) -> None:
    """The cause of a sweep interrupted during its last trial registering a champion: on SIGINT Tune
    stops the running trial after saving it as running, and its ResultGrid counts it TERMINATED."""
    from ray import tune

    def interrupts_its_driver(config):
        for step in range(600):
            tune.report({"epoch": step})
            if step == 1:
                os.kill(config["driver"], signal.SIGINT)
            time.sleep(0.05)

    # (a trial that returns counts as ended: the next test's first fit)
    grid = _tuner(interrupts_its_driver, tmp_path, "interrupted", driver=os.getpid()).fit()
    assert grid.num_terminated == 1  # Tune's count: the stopped trial looks finished
    assert trials_ended(grid) == 0


def test_a_trial_that_ended_before_a_resume_counts_as_ended(ray_session, tmp_path: Path, monkeypatch) -> None:
    """The cause of a resumed sweep ending "interrupted: 1 of 2 trials ended" after its last trial
    finished: a trial that returned while a snapshot of the sweep held its last report comes back from the
    saved sweep TERMINATED but without Tune's ``done``; the saved sweep's trial states say it ended."""
    from ray import tune

    # a snapshot at every step of Tune's loop: one lands between the trial's report and its return
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")

    def logs_its_model_after_its_last_report(config):
        tune.report({"epoch": 1})
        time.sleep(1.0)

    assert trials_ended(_tuner(logs_its_model_after_its_last_report, tmp_path, "ended").fit()) == 1
    path = str(tmp_path / "ended")
    before = trials_ended_before(path)
    trainable = _trainable(logs_its_model_after_its_last_report)
    grid = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True).fit()
    assert len(before) == 1 and trials_ended(grid) == 0  # the restored last result: done false
    assert trials_ended(grid, before) == 1


def _interrupt_when(
    proc: subprocess.Popen, trials: Path, sig: signal.Signals, old: frozenset[str] = frozenset()
) -> str:
    """Send ``sig`` to the sweep once its trial has a checkpoint not in ``old``; its output."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if _checkpoints(trials) - old:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before its trial made a checkpoint other than {sorted(old)}"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    return out


def _checkpoints(trials: Path) -> frozenset[str]:
    return frozenset(p.name for d in _trial_dirs(trials) for p in d.glob("checkpoint_*"))


@pytest.mark.slow
def test_interrupted_sweep_resumes_its_trial_to_the_end_once(ray_session, tmp_path: Path, capsys) -> None:
    """``montage tune`` (one trial of 3 epochs) SIGKILLed after the trial's first checkpoint, resumed, then
    stopped by SIGINT after its next checkpoint (its last trial running, none pending: what once let an
    interrupted sweep pass for a finished one) and resumed again: the trial goes on from its checkpoint each
    time and ends, one MLflow child with every epoch once and three starts, the champion registered once.
    (That a trial which ended before an interruption counts as ended on resume is the Tune-level test above.)"""
    uri = mlflow_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    path = write_tune(tmp_path, num_samples=1, scheduler={"name": "none"})
    args = ["tune", str(path), "name=intr", "base.train.epochs=3"]
    cmd = [sys.executable, "-m", "montage.cli", *args]
    trials = tmp_path / "tune" / "intr" / "trials"

    def sweep(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*cmd, *extra], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    killed = sweep()
    _interrupt_when(killed, trials, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL

    interrupted = sweep("--resume")  # the trial goes on from its checkpoint
    out = _interrupt_when(interrupted, trials, signal.SIGINT, _checkpoints(trials))
    assert interrupted.returncode == 130, out[-3000:]  # Tune saves its state and returns; nothing is registered
    assert "interrupted" in out and "--resume" in out and "registered" not in out

    # the last resume is signalled by nobody: in this process, on the session it already holds (one driver fewer)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp_path)
        code = main([*args, "--resume"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    rows = [ln for ln in out.splitlines() if ln.startswith("trial_")]
    assert len(rows) == 1 and " finished " in rows[0], out
    assert "registered montage-segmentation version 1 → @champion" in out

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("montage-segmentation").experiment_id])
    parents = [r for r in runs if r.data.tags.get("montage.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 1 and len(runs) == 2
    (child,) = children
    assert child.info.status == "FINISHED" and child.data.tags["montage.trial_status"] == "finished"
    assert sorted(int(m.step) for m in client.get_metric_history(child.info.run_id, "epoch")) == [1, 2, 3]
    assert child.data.tags["montage.starts"] == "3"  # started, killed, resumed, interrupted, resumed: no extra start
    assert len(reg_versions := client.search_model_versions("name = 'montage-segmentation'")) == 1, reg_versions
