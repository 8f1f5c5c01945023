"""Model quality: each task's tiny recipe trained on its synthetic data, beside the classical methods.

    python bench/quality.py                          # all three tasks, the packaged tiny configs
    python bench/quality.py --tasks pix2pix          # one task
    python bench/quality.py --seeds 0,1,2            # several seeds: median and range
    python bench/quality.py --docs                   # also write the table into docs/quality.md
    python bench/quality.py --threads 1              # one torch thread (shared, loaded machine)
    python bench/quality.py segmentation.train.epochs=10   # a dotted override for one task

Each task trains in this process with montage's loop (what ``montage train --no-ray`` runs),
with the global batch its 2-worker configuration has, on the whole synthetic validation set.
Beside it, measured in the same run on the same validation images (``Task.baselines``, the
code ``montage evaluate`` and the demo use):

segmentation    the untrained model; GrabCut initialised from the true mask's bounding box
harmonization   the composite itself; the colour-statistics transfer in Lab and in RGB
pix2pix         the mean training face; the mean face warped to the landmarks (piecewise affine)

Printed: one markdown table — per task and metric the trained model, each baseline, the ratio
to the task's reference (composite, mean face) and whether the model beats the strongest
classical baseline; then the wall time and steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")

from montage.core.config import load_config  # noqa: E402
from montage.core.paths import packaged_config  # noqa: E402
from montage.core.registry import TASKS  # noqa: E402
from montage.launch.local import as_one_process  # noqa: E402
from montage.platform.baselines import measure_baselines  # noqa: E402
from montage.platform.loop import Hook, Loop  # noqa: E402
from montage.platform.runner import WorkerEnv, build_loop  # noqa: E402

TASK_NAMES = ("segmentation", "harmonization", "pix2pix")


@dataclass(frozen=True)
class Row:
    metric: str  # without "val/"
    mode: str  # "max" | "min"
    target: str = ""
    limit: float = 0.0  # mode max: a bound on the value; mode min: on value ÷ the reference baseline
    reference: str = ""  # the baseline ratios are taken against (empty: none)


ROWS: dict[str, list[Row]] = {
    "segmentation": [
        Row("iou", "max", "≥ 0.92", 0.92),
        Row("dice", "max", "≥ 0.93", 0.93),
        Row("trimap_acc", "max"),
    ],
    "harmonization": [Row("fmse", "min", "≤ 0.18× composite", 0.18, "composite"), Row("psnr", "max")],
    "pix2pix": [Row("l1", "min", "≤ 0.60× mean face", 0.60, "mean_face"), Row("ssim", "max")],
}


def measure(task: str, seed: int, overrides: list[str]) -> dict[str, float]:
    """Train the tiny recipe once: the best epoch's metrics, and each baseline's as ``<name>:<metric>``
    (``untrained:`` the model before training)."""
    cfg = load_config(
        task,
        TASKS.get(task).spec,
        packaged_config(f"{task}-tiny"),
        [f"train.seed={seed}", "tracking.enabled=false", "train.progress=false", *overrides],
    )
    as_one_process(cfg)
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cuda" if torch.cuda.is_available() else "cpu")), hooks=[])
    out = {f"untrained:{k[4:]}": v for k, v in loop.evaluate().items() if k.startswith("val/")}
    t_base = time.perf_counter()
    for name, metrics in measure_baselines(loop.task, loop.val_loader.dataset).items():
        out.update({f"{name}:{k}": v for k, v in metrics.items()})
    out["baselines_s"] = time.perf_counter() - t_base
    best: dict[str, float] = {}

    class KeepBest(Hook):
        def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
            if loop.is_best:
                best.clear()
                best.update({k[4:]: v for k, v in metrics.items() if k.startswith("val/")})

    loop.hooks.append(KeepBest())
    t0 = time.perf_counter()
    loop.fit()
    out["wall_s"] = time.perf_counter() - t0
    out.update({f"trained:{k}": v for k, v in best.items()})
    out["steps"] = float(loop.epoch * len(loop.train_loader))
    return out


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.median(values):.4g} ({min(values):.4g}–{max(values):.4g})"


def baselines_of(run: dict[str, float], metric: str) -> list[str]:
    return [k.split(":")[0] for k in run if k.endswith(f":{metric}") and not k.startswith(("trained:", "untrained:"))]


def table(tasks: list[str], runs: dict[str, list[dict[str, float]]]) -> tuple[list[str], bool]:
    lines = [
        "| task | metric | method | value | ratio | target | met / beats |",
        "|---|---|---|---|---|---|---|",
    ]
    all_met = True
    for task in tasks:
        rs = runs[task]
        for row in ROWS[task]:
            ref = [r[f"{row.reference}:{row.metric}"] for r in rs] if row.reference else []

            def ratio(vals: list[float]) -> str:
                return fmt([v / b for v, b in zip(vals, ref)]) + f"× {row.reference.replace('_', ' ')}" if ref else ""

            trained = [r[f"trained:{row.metric}"] for r in rs]
            if row.target:
                value = (
                    statistics.median(trained)
                    if row.mode == "max"
                    else statistics.median([t / b for t, b in zip(trained, ref)])
                )
                met = value >= row.limit if row.mode == "max" else value <= row.limit
                all_met &= met
                met_text = "yes" if met else "no"
            else:
                met_text = ""
            lines.append(
                f"| {task} | val/{row.metric} | **trained** | {fmt(trained)} | {ratio(trained)} | {row.target} "
                f"| {met_text} |"
            )
            names = ["untrained"] * (f"untrained:{row.metric}" in rs[0] and task == "segmentation")
            names += baselines_of(rs[0], row.metric)
            classical = [n for n in names if n != "untrained"]
            for name in names:
                vals = [r[f"{name}:{row.metric}"] for r in rs]
                lines.append(f"| | | {name.replace('_', ' ')} | {fmt(vals)} | {ratio(vals)} | | |")
            if classical:
                pick = max if row.mode == "max" else min
                strongest = pick(classical, key=lambda n: statistics.median(r[f"{n}:{row.metric}"] for r in rs))
                best_vals = [r[f"{strongest}:{row.metric}"] for r in rs]
                wins = sum((t > b) if row.mode == "max" else (t < b) for t, b in zip(trained, best_vals))
                lines.append(
                    f"| | | trained ÷ strongest classical ({strongest.replace('_', ' ')}) | "
                    f"{fmt([t / b for t, b in zip(trained, best_vals)])} | | | "
                    f"{'yes' if wins == len(rs) else 'no'} ({wins}/{len(rs)} seeds) |"
                )
        lines.append(
            f"| {task} | | steps, training wall s | {fmt([r['steps'] for r in rs])} steps, "
            f"{fmt([r['wall_s'] for r in rs])} s | | | |"
        )
    return lines, all_met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a loaded machine"
    )
    parser.add_argument("--docs", action="store_true", help="also write the table into its block of docs/quality.md")
    parser.add_argument("overrides", nargs="*", help="<task>.<dotted.key>=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in ROWS:
            parser.error(f"unknown task '{t}'; valid: {', '.join(TASK_NAMES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict[str, float]]] = {}
    for task in tasks:
        over = [o.split(".", 1)[1] for o in args.overrides if o.startswith(task + ".")]
        runs[task] = []
        for seed in seeds:
            runs[task].append(measure(task, seed, over))
            r = runs[task][-1]
            print(f"[{task} seed {seed}] {r['wall_s']:.0f} s (baselines {r['baselines_s']:.0f} s)", file=sys.stderr)
    lines, all_met = table(tasks, runs)
    footer = (
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; seeds {seeds}; "
        f"overrides {args.overrides or 'none'}; every target met: {all_met}"
    )
    print("\n".join(lines))
    print(f"\n{footer}")
    if args.docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from docs_table import publish

        publish("docs/quality.md", "quality", "\n".join(lines) + "\n\n" + footer, markdown=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
