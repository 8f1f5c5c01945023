"""``paste`` works within the output's size: an enlarged person is sampled only where visible."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest

from montage.core.serve_sections import ServeConfig
from montage.serve.imaging import Placement, paste


def _reference(person, alpha, background, where):
    """The whole person resized, then cropped (what paste did before), for small sizes."""
    bh, bw = background.shape[:2]
    ph, pw = person.shape[:2]
    th = max(1, int(round(where.scale * bh)))
    tw = max(1, int(round(pw * th / ph)))
    p = cv2.resize(person, (tw, th), interpolation=cv2.INTER_AREA if th < ph else cv2.INTER_LINEAR).astype(np.float32)
    a = np.clip(cv2.resize(alpha, (tw, th), interpolation=cv2.INTER_LINEAR), 0, 1)
    x0, y0 = int(round(where.x * bw)) - tw // 2, int(round(where.y * bh)) - th // 2
    comp = background.astype(np.float32)
    for y in range(max(0, y0), min(bh, y0 + th)):
        for x in range(max(0, x0), min(bw, x0 + tw)):
            w = a[y - y0, x - x0]
            comp[y, x] = p[y - y0, x - x0] * w + comp[y, x] * (1 - w)
    return comp.round()


@pytest.mark.parametrize("where", [Placement(0.5, 0.6, 2.0), Placement(0.1, 0.9, 3.7), Placement(0.5, 0.5, 0.5)])
def test_paste_matches_resize_then_crop(where: Placement) -> None:
    rng = np.random.default_rng(0)
    person = cv2.GaussianBlur(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), (5, 5), 0)
    alpha = rng.random((40, 30)).astype(np.float32)
    bg = rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)
    comp, mask = paste(person, alpha, bg, where)
    assert np.abs(comp.astype(int) - _reference(person, alpha, bg, where)).max() <= 1
    assert mask.any() and comp.shape == bg.shape


def test_worst_case_allowed_by_the_limits_is_bounded_by_the_output() -> None:
    """A max_side person at scale 4 on a max_side background: the old paste made the whole 16384²
    person (0.8 GB of RGB, 1 GB of float alpha) before cropping; now the extra memory is a few
    output-sized arrays."""
    side = ServeConfig().max_side  # the default limit (4096)
    person = np.full((side, side, 3), 200, np.uint8)
    alpha = np.ones((side, side), np.float32)
    bg = np.zeros((side, side, 3), np.uint8)
    tracemalloc.start()
    try:
        comp, mask = paste(person, alpha, bg, Placement(0.5, 0.5, 4.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (comp == 200).all() and (mask == 255).all()  # the centre of the enlarged person covers everything
    output = comp.nbytes + mask.nbytes
    assert peak < 4 * output, f"peak {peak / 2**20:.0f} MiB for an output of {output / 2**20:.0f} MiB"
