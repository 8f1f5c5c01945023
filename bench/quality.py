"""Model quality: each task's tiny recipe trained on its synthetic data, against its baseline.

    python bench/quality.py                          # all three tasks, the packaged tiny configs
    python bench/quality.py --tasks pix2pix          # one task
    python bench/quality.py --seeds 0,1,2            # several seeds: median and range
    python bench/quality.py segmentation.train.epochs=10   # a dotted override for one task

Each task trains in this process with montage's loop (what ``montage train --no-ray`` runs),
with the global batch its 2-worker configuration has, on the whole synthetic validation set.
The baseline is measured in the same run on the same validation set:

segmentation    val/iou of the untrained model (and its Dice and trimap accuracy)
harmonization   val/fmse of the composite itself (the input, unharmonized)
pix2pix         val/l1 of the mean training face (whatever the landmarks)

Printed: one markdown table — task, metric, baseline, trained, ratio, target, wall time.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

os.environ.setdefault("TQDM_DISABLE", "1")

from montage.core.config import load_config  # noqa: E402
from montage.core.paths import packaged_config  # noqa: E402
from montage.core.registry import TASKS  # noqa: E402
from montage.launch.local import as_one_process  # noqa: E402
from montage.platform.loop import Hook, Loop  # noqa: E402
from montage.platform.runner import WorkerEnv, build_loop  # noqa: E402

TASK_NAMES = ("segmentation", "harmonization", "pix2pix")


@dataclass(frozen=True)
class Row:
    metric: str
    baseline: str  # "untrained" → the untrained model's value of ``metric``; else a metric holding the baseline
    target: str
    limit: float  # the target, as a bound on trained (mode max) or on trained ÷ baseline (mode min)
    mode: str


ROWS: dict[str, list[Row]] = {
    "segmentation": [
        Row("val/iou", "untrained", "≥ 0.90", 0.90, "max"),
        Row("val/dice", "untrained", "≥ 0.93", 0.93, "max"),
        Row("val/trimap_acc", "untrained", "", 0.0, "max"),
    ],
    "harmonization": [Row("val/fmse", "val/baseline_fmse", "≤ 0.30× composite", 0.30, "min")],
    "pix2pix": [Row("val/l1", "val/baseline_l1", "≤ 0.60× mean face", 0.60, "min")],
}


def measure(task: str, seed: int, overrides: list[str]) -> dict[str, float]:
    """Train the tiny recipe once; the untrained and best-epoch validation metrics."""
    cfg = load_config(
        task,
        TASKS.get(task).spec,
        packaged_config(f"{task}-tiny"),
        [f"train.seed={seed}", "tracking.enabled=false", "train.progress=false", *overrides],
    )
    as_one_process(cfg)
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu")), hooks=[])
    untrained = loop.evaluate()
    t0 = time.perf_counter()
    best: dict[str, float] = {}

    class KeepBest(Hook):
        def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
            if loop.is_best:
                best.clear()
                best.update(metrics)

    loop.hooks.append(KeepBest())
    loop.fit()
    out = {f"untrained:{k}": v for k, v in untrained.items()}
    out.update(best)
    out["wall_s"] = time.perf_counter() - t0
    out["steps"] = float(loop.epoch * len(loop.train_loader))
    return out


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.median(values):.4g} ({min(values):.4g}–{max(values):.4g})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("overrides", nargs="*", help="<task>.<dotted.key>=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in ROWS:
            parser.error(f"unknown task '{t}'; valid: {', '.join(TASK_NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [
        "| task | metric | baseline | baseline value | trained | ratio | target | met | steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    all_met = True
    for task in tasks:
        over = [o.split(".", 1)[1] for o in args.overrides if o.startswith(task + ".")]
        runs = []
        for seed in seeds:
            runs.append(measure(task, seed, over))
            print(f"[{task} seed {seed}] {runs[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
        for row in ROWS[task]:
            base_key = f"untrained:{row.metric}" if row.baseline == "untrained" else row.baseline
            base = [r[base_key] for r in runs]
            trained = [r[row.metric] for r in runs]
            ratio = [t / b for t, b in zip(trained, base) if b]  # an untrained IoU of 0 has no ratio
            value = statistics.median(trained) if row.mode == "max" else statistics.median(ratio)
            ratio_text = fmt(ratio) if len(ratio) == len(trained) else "—"
            met = (
                ""
                if not row.target
                else ("yes" if (value >= row.limit if row.mode == "max" else value <= row.limit) else "no")
            )
            all_met &= met != "no"
            kind = (
                "untrained model"
                if row.baseline == "untrained"
                else {"val/baseline_fmse": "composite", "val/baseline_l1": "mean face"}[row.baseline]
            )
            lines.append(
                f"| {task} | {row.metric} | {kind} | {fmt(base)} | {fmt(trained)} | {ratio_text} | {row.target} | "
                f"{met} "
                f"| {fmt([r['steps'] for r in runs])} | {fmt([r['wall_s'] for r in runs])} |"
            )
    print("\n".join(lines))
    print(f"\n{torch.get_num_threads()} torch threads; seeds {seeds}; every target met: {all_met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
