"""Rebuild a task's networks from a checkpoint for inference (CLI predict, MLflow pyfunc, Serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from montage.core.config import build_config
from montage.core.registry import TASKS
from montage.platform.checkpoint import load_checkpoint
from montage.platform.task import Task


def load_for_inference(path: str | Path, task: str | None = None, device: str | torch.device = "cpu") -> tuple[Task, dict[str, nn.Module]]:
    """(task with the checkpoint's config, its networks in eval mode on ``device``)."""
    state = load_checkpoint(path, task=task)
    task_cls = TASKS.get(state["task"])
    cfg = build_config(task_cls.name, task_cls.spec, state["config"])
    inst = task_cls(cfg)
    nets = inst.build_nets(pretrained=False)
    for name, net in nets.items():
        if name not in state["nets"]:
            continue  # e.g. a discriminator not needed at inference is still saved; extra nets ignored
        net.load_state_dict(state["nets"][name])
        net.to(device).eval()
    return inst, nets


def load_predictor(path: str | Path, task: str | None = None, device: str | torch.device | None = None) -> Any:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inst, nets = load_for_inference(path, task, device)
    return inst.make_predictor(nets, device)
