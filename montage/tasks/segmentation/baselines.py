"""Classical segmentation: OpenCV's GrabCut initialised from the true mask's bounding box.

A box around the person is the input an interactive tool asks for; GrabCut (iterated graph
cuts on colour GMMs, Rother et al. 2004) segments inside it with no learning. Seeded, so the
figures are the same every run.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def grabcut_one(image: np.ndarray, mask: np.ndarray, iterations: int = 5, seed: int = 0) -> np.ndarray:
    """image (H, W, 3) uint8 RGB, true mask (H, W) bool → GrabCut's foreground (H, W) float in {0, 1},
    initialised with the mask's bounding box (an empty mask gives an empty prediction)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(mask.shape, np.float32)
    h, w = mask.shape
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if x1 - x0 >= w and y1 - y0 >= h:  # GrabCut needs some background outside the box
        x0, y0, x1, y1 = 1, 1, w - 1, h - 1
    cv2.setRNGSeed(seed)
    labels = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(
            cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
            labels,
            (x0, y0, x1 - x0, y1 - y0),
            bgd,
            fgd,
            iterations,
            cv2.GC_INIT_WITH_RECT,
        )
    except cv2.error:  # a degenerate box (e.g. one pixel wide): the box itself
        labels[y0:y1, x0:x1] = cv2.GC_PR_FGD
    return np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)


def grabcut(images: torch.Tensor, masks: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] and (B, 1, H, W) true masks → (B, 1, H, W) GrabCut masks."""
    imgs = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    truth = masks.detach().float().cpu()[:, 0].numpy() > 0.5
    out = np.stack([grabcut_one(i, m, iterations) for i, m in zip(imgs, truth)])
    return torch.from_numpy(out)[:, None].to(images.device)
