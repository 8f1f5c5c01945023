"""Exact resume in one process: a run paused after its first epoch and resumed ends bit for bit where
the uninterrupted run ends (every task's networks, optimizers, schedulers and scalers), and reports the
same best metric. The same under Ray Train with 2 DDP workers: test_distributed (the shared Ray session's
worker), which reuses the comparison below."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from montage.launch.local import fit_local
from montage.platform.checkpoint import load_checkpoint


def _state(path: str, task: str) -> dict:
    return load_checkpoint(path, task=task)


def _assert_same(a, b, where: str = "") -> None:
    """Bit-identical nested state (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


RESUME = ["train.batch_size=4", "train.epochs=2", "sched.name=onecycle"]


def assert_resumed_like_straight(straight, resumed, task: str) -> None:
    a, b = _state(straight.checkpoint, task), _state(resumed.checkpoint, task)
    assert a["epoch"] == b["epoch"] == 2
    for part in ("nets", "optimizers", "schedulers", "scalers"):
        _assert_same(a[part], b[part], part)
    assert resumed.metrics[straight.best_metric] == straight.metrics[straight.best_metric]


@pytest.mark.parametrize("task", ["segmentation", "harmonization", "pix2pix"])
def test_resume_in_one_process_matches_the_uninterrupted_run(tiny_config, tmp_path: Path, task: str) -> None:
    # every task's state (pix2pix: both nets, optimizers, schedulers and scalers), augmentation and
    # dropout as configured, a per-step one-cycle schedule whose learning rate changes across the pause
    common = [*RESUME, "tracking.enabled=false"]
    straight = fit_local(tiny_config(task, *common, "run.name=straight"))
    paused = fit_local(tiny_config(task, *common, "run.name=paused", "train.pause_after=1"))
    assert paused.metrics["epoch"] == 1
    resumed = fit_local(tiny_config(task, *common), resume=tmp_path / "runs" / "paused")
    assert resumed.metrics["epoch"] == 2
    assert_resumed_like_straight(straight, resumed, task)
