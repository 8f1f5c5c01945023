"""Interrupted sweeps: what Tune says of a trial stopped by SIGINT or restored from a saved sweep, and
``montage tune --resume`` after SIGKILL and SIGINT running every trial to its end, once."""

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


def _interrupt_when(proc: subprocess.Popen, trials: Path, trial: int, sig: signal.Signals) -> str:
    """Send ``sig`` to the sweep once trial ``trial`` (1-based, in start order) has its first
    checkpoint; its output."""
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        dirs = _trial_dirs(trials)
        if len(dirs) >= trial and any(dirs[trial - 1].glob("checkpoint_*")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended before trial {trial} checkpointed"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    return out


@pytest.mark.slow
def test_interrupted_sweep_resumes_every_trial_once(ray_session, tmp_path: Path, capsys) -> None:
    """``montage tune`` (2 trials of 2 epochs, one at a time) SIGKILLed during trial 1, resumed, then
    stopped by SIGINT during its last trial (no trial left pending, which once let an interrupted sweep
    pass for a finished one) and resumed again: every trial ends, none runs again once it ended, one
    MLflow child per trial with every epoch once, the champion registered once."""
    uri = mlflow_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    path = write_tune(tmp_path, max_concurrent=1, num_samples=2, scheduler={"name": "none"})
    cmd = [sys.executable, "-m", "montage.cli", "tune", str(path), "name=intr"]
    trials = tmp_path / "tune" / "intr" / "trials"

    def sweep(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*cmd, *extra], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    killed = sweep()
    _interrupt_when(killed, trials, 1, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL

    interrupted = sweep("--resume")  # trial 1 goes on from its checkpoint, then trial 2 starts
    out = _interrupt_when(interrupted, trials, 2, signal.SIGINT)
    assert interrupted.returncode == 130, out[-3000:]  # Tune saves its state and returns; nothing is registered
    assert "interrupted" in out and "--resume" in out and "registered" not in out
    first = _trial_dirs(trials)[0].name
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("montage-segmentation")

    def starts() -> dict[str, int]:
        runs = client.search_runs([exp.experiment_id])
        return {r.info.run_name: int(r.data.tags["montage.starts"]) for r in runs if "montage.trial" in r.data.tags}

    before = starts()  # trial 1 started twice, unless it had ended before the SIGKILL landed

    # the last resume is signalled by nobody: in this process, on the session it already holds (one driver fewer)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp_path)
        code = main(["tune", str(path), "name=intr", "--resume"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    rows = [ln for ln in out.splitlines() if ln.startswith("trial_")]
    assert len(rows) == 2 and all(" finished " in ln for ln in rows), out
    assert "registered montage-segmentation version 1 → @champion" in out

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("montage.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 and len({c.data.tags["montage.trial"] for c in children}) == 2
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["montage.trial_status"] == "finished"
        assert sorted(int(m.step) for m in client.get_metric_history(c.info.run_id, "epoch")) == [1, 2]
    after = starts()
    assert after[first] == before[first] <= 2, (before, after)  # trial 1 did not run again after it ended
    assert sum(after.values()) - after[first] == 2, after  # trial 2: started, interrupted, resumed once
    assert len(reg_versions := client.search_model_versions("name = 'montage-segmentation'")) == 1, reg_versions
