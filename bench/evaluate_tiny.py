"""`montage evaluate` on the tiny recipes: the training run's own validation numbers, and the baselines.

    python bench/evaluate_tiny.py                    # all three tasks, the packaged tiny configs
    python bench/evaluate_tiny.py --tasks segmentation
    python bench/evaluate_tiny.py --docs             # also write the table into docs/data.md

Each task's tiny recipe (what ``montage demo`` trains) is trained in this process
(``montage train --no-ray``'s ``fit_local``, its MLflow run in a temporary store), then
``montage evaluate`` scores the run's checkpoints on the checkpoint's own validation split:
the latest checkpoint against the last epoch's validation (every ``val/*`` number), the best
checkpoint against the best epoch's monitored metric. Printed: one markdown table per task with
the training run's value, ``montage evaluate``'s, whether they are equal to the last bit, and each
classical baseline ``montage evaluate`` measured on the same images (GrabCut, the colour transfer,
the warped mean face).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from montage.cli import main as montage  # noqa: E402
from montage.core.config import load_config  # noqa: E402
from montage.core.paths import packaged_config  # noqa: E402
from montage.core.registry import TASKS  # noqa: E402
from montage.launch.local import fit_local  # noqa: E402

TASK_NAMES = ("segmentation", "harmonization", "pix2pix")
SHOWN = {  # the metrics the table shows per task (all val/* numbers are compared)
    "segmentation": ("val/iou", "val/dice", "val/trimap_acc"),
    "harmonization": ("val/fmse", "val/psnr"),
    "pix2pix": ("val/l1", "val/ssim"),
}


def evaluate(task: str, checkpoint: str, out: Path) -> dict:
    argv = ["evaluate", task, "--source", checkpoint, "--out", str(out), "--no-track", "--worst", "4"]
    if montage(argv) != 0:
        raise RuntimeError(f"montage evaluate {task} --source {checkpoint} failed")
    return json.loads((out / "metrics.json").read_text())


def measure(task: str, root: Path) -> tuple[list[str], bool]:
    """Train ``task``'s tiny recipe, evaluate its checkpoints; the table's lines and whether every
    number matched."""
    cfg = load_config(
        task,
        TASKS.get(task).spec,
        packaged_config(f"{task}-tiny"),
        [f"run.storage={root / 'runs'}", f"tracking.uri=sqlite:///{root / 'mlruns.db'}",
         f"tracking.artifacts={root / 'mlartifacts'}", "tracking.log_model=false", "train.progress=false"],
    )  # fmt: skip
    t0 = time.perf_counter()
    summary = fit_local(cfg)
    wall = time.perf_counter() - t0
    last = evaluate(task, str(summary.checkpoint), root / f"{task}-latest")
    best = evaluate(task, str(summary.best_checkpoint), root / f"{task}-best")
    reference = {k: v for k, v in summary.metrics.items() if k.startswith("val/")}
    same = {k: last["metrics"].get(k) == v for k, v in reference.items()}
    best_same = best["metrics"].get(summary.best_metric) == summary.best_value
    baselines = last["baselines"]
    names = list(baselines)
    lines = [
        f"**{task}** ({wall:.0f} s of training, {int(last['metrics'].get('val/samples', 0))} validation samples; "
        f"{sum(same.values())} of {len(same)} `val/*` numbers of the last epoch equal to the last bit; "
        f"best epoch {summary.best_epoch}'s `{summary.best_metric}` {'equal' if best_same else 'DIFFERENT'})",
        "",
        "| metric | training run (last epoch) | montage evaluate | equal | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for metric in SHOWN[task]:
        cells = [f"{baselines[n].get(metric, float('nan')):.4g}" for n in names]
        lines.append(
            f"| {metric} | {reference[metric]:.6g} | {last['metrics'][metric]:.6g} | "
            f"{'yes' if same[metric] else 'no'} | " + " | ".join(cells) + " |"
        )
    lines.append(
        f"| {summary.best_metric} (best epoch) | {summary.best_value:.6g} | "
        f"{best['metrics'][summary.best_metric]:.6g} | {'yes' if best_same else 'no'} |" + " |" * len(names)
    )
    differ = [k for k, ok in same.items() if not ok]
    if differ:
        lines.append("")
        lines.append("Different: " + ", ".join(f"{k} {reference[k]!r} vs {last['metrics'].get(k)!r}" for k in differ))
    return lines, all(same.values()) and best_same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASK_NAMES))
    parser.add_argument("--docs", action="store_true", help="also write the tables into their block of docs/data.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lines: list[str] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="montage-evaluate-bench-") as tmp:
        for task in tasks:
            print(f"{task}: training the tiny recipe, then montage evaluate …", file=sys.stderr, flush=True)
            task_lines, task_ok = measure(task, Path(tmp) / task)
            lines += task_lines + [""]
            ok &= task_ok
    text = "\n".join(lines).rstrip()
    print(text)
    if args.docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from docs_table import command_line, write_block

        path = write_block("docs/data.md", "evaluate_tiny", text, command_line(), markdown=True)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
