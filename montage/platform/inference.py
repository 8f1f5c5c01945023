"""Rebuild a task's networks from a checkpoint for inference (CLI predict, MLflow pyfunc, Serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from montage.core.config import build_config
from montage.core.registry import TASKS
from montage.platform.checkpoint import load_checkpoint
from montage.platform.pruning import load_weights
from montage.platform.task import Task


def load_for_inference(
    path: str | Path, task: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Task, dict[str, nn.Module]]:
    """(task with the checkpoint's config, its networks in eval mode on ``device``)."""
    state = load_checkpoint(path, task=task)
    task_cls = TASKS.get(state["task"])
    cfg = build_config(task_cls.name, task_cls.spec, state["config"])
    inst = task_cls(cfg)
    nets = inst.build_nets(pretrained=False)
    for name, net in nets.items():
        if name not in state["nets"]:
            continue  # e.g. a discriminator not needed at inference is still saved; extra nets ignored
        load_weights(net, state["nets"][name])  # a channel-pruned network: its layer widths come from the weights
        net.to(device).eval()
    return inst, nets


def load_teacher(task: Task, path: str | Path, device: str | torch.device) -> nn.Module:
    """The frozen teacher network for ``distill.teacher`` (a local checkpoint of the same task;
    its own architecture, from its own config)."""
    if "://" in str(path):
        raise ValueError(
            f"distill.teacher {path!r} must be a local checkpoint here (the launchers download models:/ URIs)"
        )
    _, nets = load_for_inference(path, task=task.name, device=device)
    teacher = nets[task.export_net].eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class OnnxNet(nn.Module):
    """An exported network run by ONNX Runtime, in place of the PyTorch one inside a task's
    predictor (tensors in, tensors out, on the caller's device). ``transform`` is the same call
    for predictors that use a network's named method (harmonization)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from montage.platform.export import session

        self.path = str(path)
        self.session = session(path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else 0  # exported without --dynamic-batch

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        from montage.platform.export import run_session

        n = self.fixed_batch
        if n and xs[0].shape[0] != n:  # a fixed-batch model runs a larger batch in slices
            parts = [self.forward(*(x[i : i + n] for x in xs)) for i in range(0, xs[0].shape[0], n)]
            return torch.cat(parts)
        out = run_session(self.session, dict(zip(self.input_names, xs)))[0]
        return torch.from_numpy(out).to(xs[0].device)

    def transform(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.forward(*xs)


def load_onnx_predictor(onnx_path: str | Path, checkpoint: str | Path, task: str | None = None) -> Any:
    """A task's predictor whose exported network runs in ONNX Runtime (CPU, or CUDA / TensorRT
    when present); ``checkpoint`` (the version it was exported from) supplies the config."""
    inst, nets = load_for_inference(checkpoint, task, "cpu")
    nets = {**nets, inst.export_net: OnnxNet(onnx_path)}
    return inst.make_predictor(nets, torch.device("cpu"))


def load_predictor(path: str | Path, task: str | None = None, device: str | torch.device | None = None) -> Any:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inst, nets = load_for_inference(path, task, device)
    return inst.make_predictor(nets, device)
