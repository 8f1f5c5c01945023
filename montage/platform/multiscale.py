"""Multi-scale training: each training batch resized to one of ``data.scales``.

A wrapper around the training loader, not a loop change: the loop still finds the loader's
``sampler``, ``generator`` and ``dataset`` (for the epoch's seeds) through it. The size of batch
``i`` of epoch ``e`` is :func:`~montage.platform.sampling.batch_scale` of (seed, e, i) alone, so
every DDP rank resizes its share of a global batch alike and the step stays equivalent to one
process at the global batch. Validation is not wrapped: it runs at the configured size.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F

from montage.platform.sampling import batch_scale
from montage.platform.task import Batch


def resize_batch(batch: Batch, size: int) -> Batch:
    """Every floating-point (B, C, H, W) tensor of ``batch`` at ``size``×``size`` (bilinear,
    antialiased when shrinking); other entries unchanged."""
    out: Batch = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point():
            if value.shape[-2:] != (size, size):
                shrink = size < min(value.shape[-2:])
                value = F.interpolate(value, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[key] = value
    return out


class MultiScaleLoader:
    """Iterates ``loader``, resizing batch ``i`` to ``batch_scale(scales, seed, epoch, i)``."""

    def __init__(self, loader: Any, scales: list[int], seed: int) -> None:
        if not scales:
            raise ValueError("MultiScaleLoader needs at least one scale")
        self.loader, self.scales, self.seed = loader, list(scales), seed

    def __getattr__(self, name: str) -> Any:  # sampler, generator, dataset, batch_size, ...
        return getattr(self.__dict__["loader"], name)

    def __len__(self) -> int:
        return len(self.loader)

    def scale(self, step: int) -> int:
        epoch = getattr(getattr(self.loader, "sampler", None), "epoch", 0)
        return batch_scale(self.scales, self.seed, epoch, step)

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.loader):
            yield resize_batch(batch, self.scale(i))
