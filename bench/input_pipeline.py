"""The input pipeline alone: JPEG decode (OpenCV) + albumentations + collate, in images/s.

``train_bench.py`` sets this against the model's own train-step rate at the same size: the
pipeline must not be what the GPU waits on.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch


def photo_folder() -> Path:
    """32 JPEG photos (512 px) with PNG masks, written once per bench run."""
    import cv2

    from montage.platform.masks import SyntheticPersons

    tmp = Path(tempfile.gettempdir()) / f"montage-bench-photos-{os.getpid()}"
    if not (tmp / "mask" / "031.png").is_file():
        (tmp / "img").mkdir(parents=True, exist_ok=True)
        (tmp / "mask").mkdir(exist_ok=True)
        src = SyntheticPersons(32, size=512, seed=0)
        for i in range(32):
            img, alpha, _ = src.load(i)
            cv2.imwrite(str(tmp / "img" / f"{i:03d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(tmp / "mask" / f"{i:03d}.png"), alpha)
    return tmp


def pipeline(n: int, workers: int, cache: bool, size: int = 384) -> float:
    """images/s of decode (OpenCV) + albumentations + collate at ``size`` from JPEG files."""
    from montage.platform.masks import ImageMaskFolder
    from montage.tasks.segmentation.data import SegDataConfig, SegmentationDataset

    tmp = photo_folder()
    ds = SegmentationDataset(
        ImageMaskFolder(str(tmp / "img"), str(tmp / "mask")), size, SegDataConfig().augment, cache=cache
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=8,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    seen, t0 = 0, None
    while seen < n:
        for batch in loader:
            if t0 is None:
                t0 = time.perf_counter()  # after the first batch: workers are up
                continue
            seen += batch["image"].shape[0]
            if seen >= n:
                break
    return seen / (time.perf_counter() - t0)
