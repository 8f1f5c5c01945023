"""Classical harmonization: move the foreground's colour statistics to the background's.

Per channel, the foreground's mean and standard deviation are matched to the background's
(Reinhard et al. 2001, applied foreground → background), in CIE Lab or in RGB. No learning;
on a scene lit by one illuminant this is nearly the inverse of what re-lit a pasted object,
so it is the bar a trained harmonizer has to clear.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

SPACES = ("lab", "rgb")


def region_moments(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted per-channel mean and standard deviation of ``x`` (H, W, C) under ``weights`` (H, W)."""
    w = weights.astype(np.float64)[..., None]
    total = max(float(w.sum()), 1e-6)
    mu = (x * w).sum((0, 1)) / total
    sd = np.sqrt(np.maximum(((x - mu) ** 2 * w).sum((0, 1)) / total, 0.0))
    return mu, sd


def transfer_one(composite: np.ndarray, mask: np.ndarray, space: str = "lab") -> np.ndarray:
    """composite (H, W, 3) float RGB in [0, 1], mask (H, W) in [0, 1] → harmonized (H, W, 3).

    The foreground's statistics are weighted by the mask, the background's by 1 − mask; the
    transferred image is blended in by the mask (the background stays as it was)."""
    if space not in SPACES:
        raise ValueError(f"unknown colour space '{space}'; valid: {', '.join(SPACES)}")
    if mask.sum() < 1 or (1 - mask).sum() < 1:
        return composite.copy()
    x = cv2.cvtColor(composite.astype(np.float32), cv2.COLOR_RGB2Lab) if space == "lab" else composite
    x = x.astype(np.float64)
    mu_f, sd_f = region_moments(x, mask)
    mu_b, sd_b = region_moments(x, 1 - mask)
    moved = (x - mu_f) / (sd_f + 1e-6) * sd_b + mu_b
    if space == "lab":
        moved[..., 0] = moved[..., 0].clip(0, 100)
        moved = cv2.cvtColor(moved.astype(np.float32), cv2.COLOR_Lab2RGB)
    moved = moved.clip(0, 1)
    m = mask[..., None]
    return (composite + m * (moved - composite)).astype(np.float32)


def colour_transfer(composite: torch.Tensor, mask: torch.Tensor, space: str = "lab") -> torch.Tensor:
    """(B, 3, H, W) composites in [0, 1] and (B, 1, H, W) masks → the statistics transfer, same shape."""
    comp = composite.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    masks = mask.detach().float().cpu()[:, 0].numpy()
    out = np.stack([transfer_one(c, m, space) for c, m in zip(comp, masks)])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(composite.device)
