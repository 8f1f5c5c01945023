"""``montage demo``: train segmentation on synthetic data under Ray Train, then cut out a person."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from montage.platform.config import load_config
from montage.platform.registry import TASKS

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def packaged_config(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def run_demo(out: Path, workers: int = 2) -> int:
    from montage.platform.imaging import write_image
    from montage.platform.inference import load_predictor
    from montage.platform.train import fit_ray
    from montage.tasks.segmentation.sources import SyntheticPersons

    t0 = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    task = "segmentation"
    cfg = load_config(task, TASKS.get(task).spec, packaged_config("segmentation-tiny"), [
        f"scaling.workers={workers}", "train.epochs=4",
        f"run.storage={out / 'runs'}", f"run.name={task}-{time.strftime('%Y%m%d-%H%M%S')}",
        f"tracking.uri=sqlite:///{out / 'mlruns.db'}", f"tracking.artifacts={out / 'mlartifacts'}",
    ])
    log.info("demo: training %s on synthetic data with %d Ray Train workers", task, workers)
    summary = fit_ray(cfg)
    if summary["error"] or not summary["best_checkpoint"]:
        log.error("demo training failed: %s", summary["error"])
        return 1
    predictor = load_predictor(summary["best_checkpoint"], device="cpu")
    image, _, _ = SyntheticPersons(1, size=160, seed=123).load(0)
    alpha = predictor([image])[0]
    write_image(out / "person.png", image)
    write_image(out / "cutout.png", np.dstack([image, (alpha * 255).round().astype(np.uint8)]))
    m = summary["metrics"]
    print(f"\nmontage demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"  val/iou {m.get('val/iou', float('nan')):.3f} (best {m.get('best/val/iou', float('nan')):.3f}) after {m.get('epoch')} epochs")
    print(f"  run folder:      {summary['run_dir']}")
    print(f"  best checkpoint: {summary['best_checkpoint']}")
    print(f"  cut-out:         {out / 'cutout.png'}")
    print(f"  MLflow UI:       mlflow ui --backend-store-uri sqlite:///{out / 'mlruns.db'}")
    return 0
