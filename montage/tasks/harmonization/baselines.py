"""Harmonization's no-learning baselines (``Task.baselines``, ``montage evaluate``)."""

from __future__ import annotations

import cv2
import numpy as np


def statistics_transfer(comp: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The no-learning baseline: the foreground's Lab mean and spread moved to the background's
    (Reinhard transfer inside the mask, blended by the soft mask). Pure-black pixels (letterbox
    padding) do not count as background."""
    lab = cv2.cvtColor(comp.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    fg = mask > 127
    bg = (mask <= 127) & comp.any(axis=2)
    if fg.sum() < 4 or bg.sum() < 4:
        return comp.copy()
    mu, sd = lab[fg].mean(0), lab[fg].std(0) + 1e-3
    rmu, rsd = lab[bg].mean(0), lab[bg].std(0) + 1e-3
    out = (lab - mu) / sd * rsd + rmu
    out[..., 0] = out[..., 0].clip(0, 100)
    moved = cv2.cvtColor(out.astype(np.float32), cv2.COLOR_Lab2RGB).clip(0, 1) * 255
    a = (mask.astype(np.float32) / 255)[..., None]
    return (moved * a + comp * (1 - a)).round().clip(0, 255).astype(np.uint8)
