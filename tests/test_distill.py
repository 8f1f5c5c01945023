"""Knowledge distillation (``distill.teacher``): the term is zero when the student is the
teacher, a smaller student trains against a larger teacher's outputs, and bad settings fail
at config load."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from montage.core.config import ConfigError
from montage.launch.local import fit_local
from montage.platform.checkpoint import load_checkpoint
from montage.platform.runner import WorkerEnv, build_loop

NO_DROPOUT = {
    "segmentation": ["model.encoder_dropout=0", "model.bottleneck_dropout=0"],
    "harmonization": ["model.bottleneck_dropout=0"],
    "pix2pix": ["model.dropout=0"],
}


class _NoStep:
    def autocast(self):
        return contextlib.nullcontext()

    def optimize(self, loss, name="main") -> None:
        pass


@pytest.mark.parametrize("task", ["segmentation", "harmonization", "pix2pix"])
def test_distill_term_is_zero_when_the_student_is_the_teacher(tiny_config, task: str) -> None:
    base = [*NO_DROPOUT[task], "tracking.enabled=false", "train.max_steps=1"]
    teacher = fit_local(tiny_config(task, *base, "run.name=teacher")).best_checkpoint
    cfg = tiny_config(task, *base, "run.name=student", f"distill.teacher={teacher}")
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])
    loop.load_state_dict(load_checkpoint(teacher, task=task))  # the student starts as the teacher
    for net in loop.m.nets.values():
        net.eval()  # batch-norm statistics as the teacher uses them
    batch = next(iter(loop.train_loader))
    terms = loop.task.train_step(loop.m, batch, _NoStep())
    distill = terms["distill"] if "distill" in terms else terms["g_distill"]
    assert abs(float(distill)) < 1e-9

    other = fit_local(tiny_config(task, *base, "run.name=other", "train.seed=5")).best_checkpoint
    loop.load_state_dict(load_checkpoint(other, task=task))  # another student: the term is not zero
    terms = loop.task.train_step(loop.m, batch, _NoStep())
    assert (
        float(terms["distill"] if "distill" in terms else terms["g_distill"]) > 1e-7
    )  # near-untrained nets: small, not 0


def test_a_smaller_student_trains_against_a_larger_teacher(tiny_config, tmp_path: Path) -> None:
    teacher = fit_local(
        tiny_config("segmentation", "model.encoder=small", "tracking.enabled=false", "train.max_steps=2", "run.name=t")
    ).best_checkpoint
    out = fit_local(
        tiny_config(
            "segmentation",
            "tracking.enabled=false",
            "train.max_steps=2",
            "run.name=s",
            f"distill.teacher={teacher}",
            "distill.weight=0.5",
        )
    )
    assert out.error is None and out.metrics["train/distill"] > 0
    t_params = sum(v.numel() for v in load_checkpoint(teacher, task="segmentation")["nets"]["net"].values())
    s_params = sum(v.numel() for v in load_checkpoint(out.checkpoint, task="segmentation")["nets"]["net"].values())
    assert s_params < t_params / 2


@pytest.mark.parametrize(
    "override, message", [("distill.temperature=0", "temperature > 0"), ("distill.weight=-1", "weight must be >= 0")]
)
def test_bad_distill_settings_fail_at_config_load(tiny_config, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config("segmentation", override)
