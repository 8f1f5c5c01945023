"""Sanity checks before a long run (``montage check <task>``), each a pass/fail with a figure:

1. **overfit one batch**: the task's own ``train_step`` on one fixed batch, again and again; the
   total loss must fall below ``fraction`` of its start within ``steps`` steps. A loss term that
   does not move (a detached head, a frozen network, a term whose weight reaches nothing) is
   named; no gradient reaching the parameters at all fails at once.
2. **gradient flow**: per-layer gradient norms, recorded at the loop's ``before_optimizer_step``
   point (each optimizer's own parameters, after unscaling and clipping), flagging layers with
   zero (``requires_grad`` off by mistake, or cut from the graph), non-finite or exploding
   (over 1000x the median layer and over 1 in norm) gradients; a bar chart PNG.
3. **fast dev run**: one train step and one validation step end to end on real samples of the
   data config through :func:`~montage.platform.runner.build_loop` (the loop, its hooks, a
   checkpoint written and loaded back).

Everything runs in this process through the same loop as training (no task is named here).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from montage.core.config import ExperimentConfig, to_dict
from montage.platform.checkpoint import load_checkpoint
from montage.platform.hooks import CheckpointHook
from montage.platform.loop import Hook, Loop, _Stepper
from montage.platform.runner import WorkerEnv, build_loop

log = logging.getLogger(__name__)


@dataclass
class CheckResult:
    name: str
    passed: bool
    message: str
    figure: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        fig = f" [{self.figure}]" if self.figure else ""
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.message}{fig}"


def quiet_config(cfg: ExperimentConfig, storage: str | Path) -> ExperimentConfig:
    """A copy of ``cfg`` for a check: no tracking, no schedule, no sample grids, runs under ``storage``."""
    cfg = copy.deepcopy(cfg)
    cfg.tracking.enabled = False
    cfg.sched.name = "none"
    cfg.train.sample_every = 0
    cfg.train.early_stop = 0
    cfg.train.pause_after = 0
    cfg.train.progress = False
    cfg.run.storage = str(storage)
    return cfg


def check_loop(cfg: ExperimentConfig, device: torch.device, hooks: list[Hook] | None = None) -> Loop:
    """A loop of ``cfg`` in this process whose hooks are only ``hooks`` (the checks drive it step by step)."""
    loop = build_loop(cfg, WorkerEnv(device=device), [])
    loop.hooks = list(hooks or [])
    return loop


def first_batch(loop: Loop) -> dict[str, torch.Tensor]:
    for batch in loop.train_loader:
        return loop._to_device(batch)
    raise ValueError("the training loader yields no batch")


# ------------------------------------------------------------------------ gradient flow


class GradFlow(Hook):
    """Records per-layer gradient norms of each optimizer's parameters before it steps."""

    def __init__(self, loop: Loop) -> None:
        names: dict[int, str] = {}
        for net_name, _ in loop.m.nets.items():
            for pname, p in loop.m.unwrap(net_name).named_parameters():
                names[id(p)] = f"{net_name}.{pname.rsplit('.', 1)[0] if '.' in pname else pname}"
        self.layer_of = names
        self.frozen: dict[str, bool] = {}
        self.norms: dict[str, list[float]] = {}  # "<optimizer>:<layer>" → norm at each step

    def before_optimizer_step(self, loop: Loop, name: str) -> None:
        sq: dict[str, float] = {}
        for group in loop.m.optimizers[name].param_groups:
            for p in group["params"]:
                layer = f"{name}:{self.layer_of.get(id(p), '?')}"
                g = 0.0 if p.grad is None else float(p.grad.detach().float().pow(2).sum())
                sq[layer] = sq.get(layer, 0.0) + g
                self.frozen[layer] = self.frozen.get(layer, False) or not p.requires_grad
        for layer, v in sq.items():
            self.norms.setdefault(layer, []).append(math.sqrt(v) if math.isfinite(v) else float("nan"))

    def summary(self, explode: float) -> tuple[dict[str, float], dict[str, str]]:
        """(mean norm per layer, problem per flagged layer)."""
        mean = {k: float(np.mean(v)) for k, v in self.norms.items()}
        finite = [v for v in mean.values() if math.isfinite(v) and v > 0]
        median = float(np.median(finite)) if finite else 0.0
        flags: dict[str, str] = {}
        for layer, v in mean.items():
            if not math.isfinite(v):
                flags[layer] = "non-finite gradient"
            elif v == 0.0:
                flags[layer] = "zero gradient" + (" (requires_grad=False)" if self.frozen.get(layer) else "")
            elif median and v > explode * median and v > 1.0:  # relative AND absolute: a zero-initialised
                # head (harmonization's identity start) takes ~1000x the gradient of the layers behind it
                flags[layer] = f"exploding gradient ({v:.3g}, {v / median:.0f}x the median layer)"
        return mean, flags


def plot_grad_flow(norms: dict[str, float], flags: dict[str, str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(norms)
    values = [norms[k] if math.isfinite(norms[k]) and norms[k] > 0 else 1e-12 for k in layers]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(layers) + 1)))
    colors = ["tab:red" if k in flags else "tab:blue" for k in layers]
    ax.barh(range(len(layers)), values, color=colors)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("gradient L2 norm (mean over the steps; red: flagged)")
    ax.set_title("gradient flow per layer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- checks


def overfit_and_grad_flow(
    cfg: ExperimentConfig,
    out: Path,
    device: torch.device,
    steps: int = 60,
    fraction: float = 0.5,
    flow_steps: int = 3,
    explode: float = 1e3,
    still: float = 0.05,
) -> list[CheckResult]:
    """Checks 1 and 2 on one fixed batch (gradient norms over its first ``flow_steps`` steps)."""
    cfg = quiet_config(cfg, out / "runs")
    loop = check_loop(cfg, device)
    flow = GradFlow(loop)
    loop.hooks = [flow]
    batch = first_batch(loop)
    for net in loop.m.nets.values():
        net.train()
    stepper = _Stepper(loop)
    history: dict[str, list[float]] = {}
    error = ""
    for step in range(steps):
        if step == flow_steps:
            loop.hooks = []
        try:
            terms = loop.task.train_step(loop.m, batch, stepper)
        except RuntimeError as exc:  # e.g. "element 0 of tensors does not require grad"
            error = f"no gradient reaches the parameters: {str(exc).splitlines()[0]}"
            break
        except FloatingPointError as exc:
            error = str(exc)
            break
        for k, v in terms.items():
            history.setdefault(k, []).append(float(v))
    results = [_overfit_result(history, error, steps, fraction, still, out)]
    norms, flags = flow.summary(explode)
    if not norms:
        results.append(CheckResult("gradient flow", False, "no optimizer step was taken: " + (error or "?")))
        return results
    fig = str(plot_grad_flow(norms, flags, out / "grad_flow.png"))
    if flags:
        listed = "; ".join(f"{k}: {v}" for k, v in list(flags.items())[:8])
        more = f" (+{len(flags) - 8} more)" if len(flags) > 8 else ""
        msg = f"{len(flags)} of {len(norms)} layers flagged: {listed}{more}"
    else:
        finite = [v for v in norms.values() if v > 0]
        msg = f"{len(norms)} layers, norms {min(finite):.2g} … {max(finite):.2g}"
    results.append(CheckResult("gradient flow", not flags, msg, fig, {"norms": norms, "flags": flags}))
    return results


def _overfit_result(
    history: dict[str, list[float]], error: str, steps: int, fraction: float, still: float, out: Path
) -> CheckResult:
    name = "overfit one batch"
    if error and not history:
        return CheckResult(name, False, error)
    total = history.get("total", [])
    start, best = total[0], min(total)
    tail = max(1, len(total) // 10)
    stuck = []
    for k, v in history.items():
        if k == "total" or not v:
            continue
        head, end = float(np.mean(v[:tail])), float(np.mean(v[-tail:]))
        if abs(head - end) <= still * max(abs(head), 1e-8):
            stuck.append(k)
    fig = str(_plot_history(history, out / "overfit.png"))
    ok = best < fraction * start and not error
    msg = f"total {start:.4g} → {best:.4g} (min) in {len(total)} steps, target < {fraction:g}x the start"
    if error:
        msg += f"; stopped: {error}"
    if not ok:
        moved = abs(total[-1] - start) > still * max(abs(start), 1e-8)
        if not moved:
            stuck = ["total", *stuck]
        msg += "; loss term(s) that do not move: " + (", ".join(stuck) if stuck else "none (they move too slowly)")
    return CheckResult(name, ok, msg, fig, {"history": history, "still": stuck})


def _plot_history(history: dict[str, list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, v in history.items():
        if v and all(math.isfinite(x) for x in v):
            ax.plot(v, label=k, lw=2 if k == "total" else 1)
    ax.set_xlabel("step (one fixed batch)")
    ax.set_ylabel("loss term")
    if all(x > 0 for v in history.values() for x in v):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("overfit one batch")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fast_dev_run(cfg: ExperimentConfig, out: Path, device: torch.device) -> CheckResult:
    """Check 3: one train + one validation step through the loop and its hooks on the real data
    config, a checkpoint written and loaded back into a fresh loop."""
    from montage.platform.imaging import write_image

    cfg = quiet_config(cfg, out / "runs")
    cfg.train.epochs, cfg.train.max_steps, cfg.train.max_val_steps = 1, 1, 1
    cfg.train.sample_every = 1
    name = "train + validation step"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = CheckpointHook(tmp, latest=True)
        loop = build_loop(cfg, WorkerEnv(device=device), [ckpt])
        metrics = loop.fit()
        bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
        state = load_checkpoint(Path(tmp) / "latest.pt", task=cfg.task, model_config=to_dict(cfg.model))
        check_loop(cfg, device).load_state_dict(state)
    fig = None
    if loop.sample_image is not None:
        fig = str(out / "samples.png")
        write_image(fig, loop.sample_image)
    monitor = loop.best.metric
    parts = [f"{k}={metrics[k]:.4g}" for k in ("train/total", monitor) if k in metrics]
    msg = f"{' '.join(parts)}; checkpoint written and loaded back"
    if bad:
        msg += f"; non-finite: {', '.join(bad)}"
    return CheckResult(name, not bad and monitor in metrics, msg, fig, {"metrics": metrics})


def run_checks(cfg: ExperimentConfig, out: str | Path, device: str | None = None, **overfit: Any) -> list[CheckResult]:
    """The three checks (each independent: one failing does not skip the others)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if cfg.scaling.gpus and torch.cuda.is_available() else "cpu"))
    results = overfit_and_grad_flow(cfg, out, dev, **overfit)
    try:
        results.append(fast_dev_run(cfg, out, dev))
    except Exception as exc:  # noqa: BLE001 - the check reports what broke
        log.debug("fast dev run failed", exc_info=True)
        results.append(CheckResult("train + validation step", False, f"{type(exc).__name__}: {exc}"))
    return results
