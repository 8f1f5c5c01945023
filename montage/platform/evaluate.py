"""What a deployment variant is worth next to its parent: the task's validation metrics and
the inference network's latency, measured the same way for every variant (PyTorch, pruned,
student, or an ONNX / INT8 file run by ONNX Runtime)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from montage.platform.checkpoint import load_checkpoint
from montage.platform.loop import Loop
from montage.platform.runner import WorkerEnv, build_loop, config_from_tree


def evaluation_loop(checkpoint: str | Path, exported: nn.Module | None = None) -> Loop:
    """A loop over the checkpoint's own validation data with its networks loaded (CPU, one
    process, nothing tracked or trained); with ``exported`` (e.g. an ``OnnxNet``), that network
    in place of the checkpoint's exported one."""
    state = load_checkpoint(checkpoint)
    cfg = config_from_tree(state["config"])
    cfg.init.checkpoint, cfg.distill.teacher = str(checkpoint), ""
    cfg.tracking.enabled, cfg.train.progress, cfg.train.cache_data, cfg.train.compile = False, False, False, "off"
    cfg.scaling.workers, cfg.scaling.gpus = 1, False
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])
    if exported is not None:
        loop.m.nets[loop.task.export_net] = loop.task.from_exported(exported)
    return loop


def evaluate(checkpoint: str | Path, exported: nn.Module | None = None) -> dict[str, float]:
    """The checkpoint's validation metrics; with ``exported`` (e.g. an ``OnnxNet``), those of
    that network in place of the checkpoint's exported one."""
    with torch.no_grad():
        return evaluation_loop(checkpoint, exported).evaluate()


def latency_pair(a: Callable[[], Any], b: Callable[[], Any], runs: int = 20, warmup: int = 3) -> tuple[float, float]:
    """p50 wall milliseconds of ``a()`` and of ``b()`` over ``runs`` calls each, in blocks
    ordered a, b, b, a so that a drift in the machine's speed falls on both alike (blocks, not
    single calls in turns: ONNX Runtime's threads spin for a while after each run and would
    slow a PyTorch call that follows at once)."""
    times: tuple[list[float], list[float]] = ([], [])
    for j in (0, 1, 1, 0):
        fn = (a, b)[j]
        for _ in range(warmup):
            fn()
        for _ in range(max(1, runs // 2)):
            t0 = time.perf_counter()
            fn()
            times[j].append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])
