"""``montage data check`` throughput against the plain decode rate of the same files.

Writes ``--count`` generated ``--width``×``--height`` JPEGs with PNG masks (a segmentation
``folder`` source) to a temporary folder, then measures in the same run:

- baseline: ``cv2.imread`` of every image and mask in one process (nothing else), before and
  after the checks (their mean);
- ``montage data check segmentation`` (the task's own source: decode, size check, statistics,
  grid) with 0 and with 2 loader workers.

Prints samples/s and the ratio to the baseline; ``--docs`` also writes the figures into
docs/data.md between the ``bench:data_check`` markers.

    python bench/data_check_bench.py [--count 2000] [--width 1024 --height 768] [--docs]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def make_folder(root: Path, count: int, w: int, h: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    for i in range(count):
        img = np.roll(base, i * 7, axis=1)
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (w // 2 + i % 50, h // 2), (w // 6, h // 3), 0, 0, 360, 255, -1)
        cv2.imwrite(str(root / "images" / f"{i:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(root / "masks" / f"{i:05d}.png"), mask)


def cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the loader workers): unlike wall
    time, barely moved by other work on a shared machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float]:
    """(fn(*args), the CPU seconds it cost)."""
    c0 = cpu_s()
    return fn(*args), cpu_s() - c0


def plain_decode(root: Path) -> float:
    t0 = time.perf_counter()
    n = 0
    for p in sorted((root / "images").iterdir()):
        assert cv2.imread(str(p)) is not None
        assert cv2.imread(str(root / "masks" / f"{p.stem}.png"), cv2.IMREAD_UNCHANGED) is not None
        n += 1
    return n / (time.perf_counter() - t0)


def data_check(root: Path, out: Path, workers: int) -> float:
    from montage.core.config import load_config
    from montage.core.registry import TASKS
    from montage.platform.datacheck import run_check

    task_cls = TASKS.get("segmentation")
    cfg = load_config(
        "segmentation",
        task_cls.spec,
        None,
        ["data.source=folder", f"data.images={root}/images", f"data.masks={root}/masks"],
    )
    report = run_check("segmentation", "folder", task_cls(cfg).check_sources(), out, workers=workers).as_dict()
    assert report["rejected"] == [], report["rejected"][:3]
    return report["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--docs", action="store_true", help="also write the figures into docs/data.md")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="montage-data-bench-"))
    try:
        make_folder(tmp / "data", args.count, args.width, args.height)
        from montage.core.registry import TASKS

        TASKS.get("segmentation")  # imports (albumentations, pycocotools, ...) before any clock starts
        first, cpu_first = timed(plain_decode, tmp / "data")
        runs = {w: timed(data_check, tmp / "data", tmp / f"out{w}", w) for w in (0, 2)}
        last, cpu_last = timed(plain_decode, tmp / "data")
        plain = (first + last) / 2  # before and after: a drift in load falls on both
        plain_cpu = (cpu_first + cpu_last) / 2 / args.count * 1000
        rates = {w: r for w, (r, _) in runs.items()}
        cpus = {w: c / args.count * 1000 for w, (_, c) in runs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"{args.count} JPEGs {args.width}x{args.height} + PNG masks, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| reader | samples/s (wall) | × plain decode | CPU ms / sample | × plain decode |",
        "|---|---|---|---|---|",
        f"| cv2.imread image + mask, one process (baseline) | {plain:.1f} | 1.00 | {plain_cpu:.1f} | 1.00 |",
        *(
            f"| montage data check, {w} loader workers | {r:.1f} | {r / plain:.2f} | {cpus[w]:.1f} | "
            f"{cpus[w] / plain_cpu:.2f} |"
            for w, r in rates.items()
        ),
    ]
    print("\n".join(lines))
    if args.docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from docs_table import publish

        publish("docs/data.md", "data_check", "\n".join(lines), markdown=True)


if __name__ == "__main__":
    main()
