"""``montage evaluate``: a checkpoint scored on a data config through its task's own metrics,
beside the task's classical baselines on the same images, with per-image rows and the worst cases.

The model's numbers are the loop's validation numbers (the same loader, the same per-sample
``eval_step``, the same mean over samples); each baseline of :meth:`Task.baselines` is scored on
every batch the model sees. Task-agnostic: the task supplies metrics, baselines and the panels.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from montage.core.config import ConfigError, parse_override, set_dotted
from montage.platform.checkpoint import load_checkpoint
from montage.platform.imaging import image_grid, write_image
from montage.platform.loop import Loop
from montage.platform.runner import WorkerEnv, build_loop, config_from_tree

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What one evaluation measured (``metrics.json`` is :meth:`as_dict`)."""

    task: str
    checkpoint: str
    monitor: tuple[str, str]
    metrics: dict[str, float]  # the model: ``val/<metric>`` means, as the training run's validation
    baselines: dict[str, dict[str, float]]  # baseline → ``val/<metric>`` means on the same images
    per_image: list[dict[str, float]] = field(default_factory=list)  # index + the model's metrics per sample
    worst: list[int] = field(default_factory=list)  # sample indices, worst first by the monitor
    data: dict[str, Any] = field(default_factory=dict)  # the data config evaluated on

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "checkpoint": self.checkpoint,
            "monitor": list(self.monitor),
            "metrics": self.metrics,
            "baselines": self.baselines,
            "worst": self.worst,
            "data": self.data,
        }


def evaluation_setup(checkpoint: str | Path, task: str | None = None, data_overrides: list[str] | None = None) -> Loop:
    """A loop over the checkpoint's validation data (or the data that ``data_overrides`` —
    ``key=value`` pairs of the data section — describe), its networks loaded, on the CPU in
    this process, nothing tracked or trained."""
    state = load_checkpoint(checkpoint, task=task)
    tree = state["config"]
    for text in data_overrides or []:
        key, value = parse_override(text)
        key = key if key.startswith("data.") else f"data.{key}"
        set_dotted(tree, key, value)
    try:
        cfg = config_from_tree(tree)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"data overrides {data_overrides}: {exc}") from exc
    cfg.init.checkpoint, cfg.distill.teacher = str(checkpoint), ""
    cfg.tracking.enabled, cfg.train.progress, cfg.train.cache_data, cfg.train.compile = False, False, False, "off"
    cfg.scaling.workers, cfg.scaling.gpus = 1, False
    return build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])


def _accumulate(sums: dict[str, float], counts: dict[str, float], values: dict[str, torch.Tensor]) -> None:
    for k, v in values.items():
        v = v.detach().float()
        sums[k] = sums.get(k, 0.0) + float(v.sum())
        counts[k] = counts.get(k, 0.0) + v.numel()


def _means(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    return {f"val/{k}": sums[k] / counts[k] for k in sums if counts[k]}


@torch.no_grad()
def evaluate_loop(loop: Loop, worst: int = 8) -> Evaluation:
    """One pass over ``loop``'s validation loader: the model's and every baseline's metrics."""
    for net in loop.m.nets.values():
        net.eval()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    base_sums: dict[str, dict[str, float]] = {}
    base_counts: dict[str, dict[str, float]] = {}
    rows: list[dict[str, float]] = []
    max_steps = loop.cfg.train.max_val_steps
    for i, batch in enumerate(loop.val_loader):
        if max_steps and i >= max_steps:
            break
        batch = loop._to_device(batch)
        with loop.autocast():
            values = loop.task.eval_step(loop.m, batch)
        _accumulate(sums, counts, values)
        for name, b_values in loop.task.baselines(batch).items():
            _accumulate(base_sums.setdefault(name, {}), base_counts.setdefault(name, {}), b_values)
        n = next(iter(batch.values())).shape[0]
        per = {k: v.detach().float().cpu() for k, v in values.items() if v.ndim == 1 and v.shape[0] == n}
        for j in range(n):
            rows.append({"index": len(rows), **{k: float(v[j]) for k, v in per.items()}})
    metrics = _means(sums, counts)
    metrics["val/samples"] = float(len(rows))
    baselines = {name: _means(base_sums[name], base_counts[name]) for name in base_sums}
    metric, mode = loop.task.monitor
    key = metric.split("/", 1)[-1]
    scored = [r for r in rows if key in r and not math.isnan(r[key])]
    scored.sort(key=lambda r: r[key], reverse=(mode == "min"))  # worst first
    return Evaluation(
        task=loop.task.name,
        checkpoint=str(loop.cfg.init.checkpoint),
        monitor=(metric, mode),
        metrics=metrics,
        baselines=baselines,
        per_image=rows,
        worst=[int(r["index"]) for r in scored[:worst]],
        data=_data_dict(loop.cfg.data),
    )


def _data_dict(data: Any) -> dict[str, Any]:
    from montage.core.config import to_dict

    return to_dict(data)


def comparison_table(ev: Evaluation) -> list[list[str]]:
    """Rows ``[metric, model, baseline 1, ...]`` over the metrics the model and a baseline share."""
    names = sorted(ev.baselines)
    keys = [k for k in ev.metrics if any(k in ev.baselines[b] for b in names)] or list(ev.metrics)
    rows = [["metric", "model", *names]]
    for k in keys:
        rows.append(
            [k, f"{ev.metrics[k]:.4g}", *(f"{ev.baselines[b][k]:.4g}" if k in ev.baselines[b] else "-" for b in names)]
        )
    return rows


def worst_grid(loop: Loop, indices: list[int]) -> np.ndarray | None:
    """A PNG grid of the samples at ``indices`` of the validation set: one row each, the task's
    panels (input, prediction, truth, error map) as columns."""
    if not indices:
        return None
    ds = loop.val_loader.dataset
    batch = loop._to_device(default_collate([ds[i] for i in indices]))
    with torch.no_grad():
        panels = loop.task.panels(loop.m, batch)
    return image_grid(list(panels.values()), max_rows=len(indices))


def write_report(loop: Loop, ev: Evaluation, out: str | Path) -> dict[str, Path]:
    """``metrics.json``, ``comparison.md`` (model vs baselines), ``per_image.csv``, ``worst.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out / "metrics.json", "comparison": out / "comparison.md", "per_image": out / "per_image.csv"}
    files["metrics"].write_text(json.dumps(ev.as_dict(), indent=2, default=str))
    table = comparison_table(ev)
    md = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(r) + " |" for r in table[1:]]
    files["comparison"].write_text("\n".join(md) + "\n")
    if ev.per_image:
        keys = list(dict.fromkeys(k for r in ev.per_image for k in r))
        with files["per_image"].open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(ev.per_image)
    try:
        grid = worst_grid(loop, ev.worst)
    except NotImplementedError as exc:
        log.warning("no worst-case picture: %s", exc)
        grid = None
    if grid is not None:
        files["worst"] = out / "worst.png"
        write_image(files["worst"], grid)
    return files
