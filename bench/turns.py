"""Measurement processes that take turns, so every configuration sees the same machine.

A shared VM drifts by 10–20 % over seconds; configurations measured one after another then
differ by the drift, not by what they do. :func:`take_turns` runs each configuration in its
own process (so its peak memory is its own) and lets them train one epoch at a time in a
ring — A, B, C, A, B, C, … — so a slow phase of the machine falls on all of them alike.
Only one process computes at a time; the others block on an event.

The processes are forked from a multiprocessing fork server that imported torch, torchvision
and montage once, so each starts in ~0.1 s instead of the seconds a fresh interpreter
spends on imports.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any, Callable

import torch

from montage.platform.hooks import peak_rss_mb
from montage.platform.loop import Hook

PRELOAD = [
    "__main__",
    "torchvision",
    "montage.tasks.segmentation.task",
    "montage.tasks.harmonization.task",
    "montage.tasks.pix2pix.task",
]


def context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first use)
    return ctx


class Baton:
    """This process's place in the ring: wait for the turn, train one epoch, pass it on."""

    def __init__(self, index: int, events: list[Any], dead: Any, ready: Any) -> None:
        self.index, self.events, self.dead, self.ready = index, events, dead, ready
        self.holding = False

    def wait(self) -> None:
        if not self.ready.is_set():
            self.ready.set()  # built: the coordinator starts the ring once every process is
        self.events[self.index].wait()
        self.events[self.index].clear()
        self.holding = True

    def pass_on(self) -> None:
        """Hand the turn to the next process still running (or keep it if this is the last)."""
        self.holding = False
        n = len(self.events)
        for step in range(1, n + 1):
            nxt = (self.index + step) % n
            if not self.dead[nxt] or nxt == self.index:
                self.events[nxt].set()
                return

    def leave(self) -> None:
        """Done or failed: drop out of the ring, passing the turn on if this process held it."""
        self.dead[self.index] = 1
        self.ready.set()
        if self.holding:
            self.pass_on()


class BatonHook(Hook):
    """montage's loop in the ring: each epoch starts on its turn and hands the turn on after."""

    def __init__(self, baton: Baton) -> None:
        self.baton = baton

    def before_train(self, loop: Any) -> None:
        self.baton.wait()

    def after_epoch(self, loop: Any, metrics: dict[str, float]) -> None:
        self.baton.pass_on()
        if loop.epoch < loop.cfg.train.epochs:
            self.baton.wait()


def _run(fn: Callable[..., Any], args: tuple, baton: Baton, out: Any) -> None:
    try:
        result = fn(*args, baton=baton)
        out.put(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator, which decides
        out.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"))
    finally:
        baton.leave()


def take_turns(jobs: list[tuple[Callable[..., Any], tuple]], timeout: float = 1800) -> list[Any]:
    """Run ``fn(*args, baton=...)`` for each job in its own process, epochs in a ring.

    Returns each job's result, or an ``Exception`` for a job that failed (the others go on)."""
    ctx = context()
    n = len(jobs)
    events = [ctx.Event() for _ in jobs]
    ready = [ctx.Event() for _ in jobs]
    dead = ctx.Array("b", n)
    outs = [ctx.Queue() for _ in jobs]
    procs = [
        ctx.Process(target=_run, args=(fn, args, Baton(i, events, dead, ready[i]), outs[i]), daemon=True)
        for i, (fn, args) in enumerate(jobs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for i, r in enumerate(ready):
        while not r.wait(1.0):
            if not procs[i].is_alive() or time.monotonic() > deadline:
                break
    first = next((i for i in range(n) if not dead[i]), None)
    if first is not None:
        events[first].set()
    results: list[Any] = []
    for i, (p, out) in enumerate(zip(procs, outs)):
        status, value = "error", "timed out"
        while time.monotonic() < deadline:
            try:
                status, value = out.get(timeout=1.0)
                break
            except queue.Empty:
                if not p.is_alive() and out.empty():
                    status, value = "error", f"exited with code {p.exitcode} before reporting"
                    break
        results.append(value if status == "ok" else RuntimeError(value))
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return results


def reset_peak() -> None:
    """Linux: restart this process's peak-RSS counter (VmHWM), so each configuration gets its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> tuple[float, float]:
    """(peak RSS since reset_peak, CUDA max allocated) in MiB."""
    rss = peak_rss_mb()
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return rss, (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0)
