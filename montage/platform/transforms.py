"""Sample transforms every image task shares: the deterministic letterbox (resize the long
side, pad to a square) that a sample cache stores, and uint8 image → float tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

if TYPE_CHECKING:  # imported where a dataset is built (~0.7 s of CPU): serving and the CLI need not pay it
    import albumentations as A


def letterbox_ops(size: int) -> list[A.BasicTransform]:
    """Resize the long side to ``size`` and pad to size×size: deterministic, so a cache can
    store the result and augmentation runs on it."""
    import albumentations as A

    return [
        A.LongestMaxSize(max_size=size, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_LINEAR),
        A.PadIfNeeded(
            min_height=size, min_width=size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0
        ),
    ]


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
