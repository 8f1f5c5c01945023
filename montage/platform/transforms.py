"""Sample transforms every image task shares: the deterministic letterbox (resize the long
side, pad to a square) that a sample cache stores, and uint8 image → float tensor."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch


def letterbox_ops(size: int) -> list[A.BasicTransform]:
    """Resize the long side to ``size`` and pad to size×size: deterministic, so a cache can
    store the result and augmentation runs on it."""
    return [
        A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_LINEAR),
        A.PadIfNeeded(
            min_height=size, min_width=size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0
        ),
    ]


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
