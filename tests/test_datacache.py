"""train.cache_data: cached samples are exactly the uncached ones, each split caches only its
own indices, and a cache that cannot fit is refused with a message naming the option."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from montage.platform import datacache
from montage.platform.datacache import CacheTooLargeError, SampleCache
from montage.tasks.harmonization.data import HarmDataConfig
from montage.tasks.harmonization.data import build_datasets as harm_datasets
from montage.tasks.pix2pix.data import GanDataConfig
from montage.tasks.pix2pix.data import build_datasets as gan_datasets
from montage.tasks.segmentation.data import SegDataConfig
from montage.tasks.segmentation.data import build_datasets as seg_datasets


def folder_of_photos(root: Path, n: int = 10) -> SegDataConfig:
    """Non-square photos of different sizes: letterboxing does real work."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    (root / "mask").mkdir()
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (w // 2, h // 2), min(h, w) // 3, 255, -1)
        cv2.imwrite(str(root / "img" / f"{i}.png"), img)
        cv2.imwrite(str(root / "mask" / f"{i}.png"), mask)
    return SegDataConfig(source="folder", images=str(root / "img"), masks=str(root / "mask"), size=64, val_fraction=0.3)


def same_items(a, b, n: int, seed: int = 0) -> bool:
    """Items 0..n-1 of two datasets, drawn under the same global seeds, are identical."""
    out = []
    for ds in (a, b):
        np.random.seed(seed)
        torch.manual_seed(seed)
        out.append([ds[i] for i in range(n)])
    return all(torch.equal(x[k], y[k]) for x, y in zip(*out) for k in x)


def test_segmentation_cache_is_exact_and_per_split(tmp_path: Path) -> None:
    cfg = folder_of_photos(tmp_path)
    (train, val), (ctrain, cval) = seg_datasets(cfg), seg_datasets(cfg, cache=True)
    assert same_items(val, cval, len(val))
    assert same_items(train, ctrain, len(train))  # augmentation draws the same, on cached arrays
    # the val split carved from the training folder caches only its own samples
    assert set(ctrain.dataset.samples.items) == set(ctrain.indices)
    assert set(cval.dataset.samples.items) == set(cval.indices)
    assert not train.dataset.samples.items  # off: nothing held
    image, alpha, valid = ctrain.dataset.samples.items[ctrain.indices[0]]
    assert image.shape == (64, 64, 3) and alpha.shape == valid.shape == (64, 64)  # stored letterboxed


def test_harmonization_and_pix2pix_cache_is_exact() -> None:
    hcfg = HarmDataConfig(size=32, synthetic_train=6, synthetic_val=3)
    (ht, hv), (cht, chv) = harm_datasets(hcfg), harm_datasets(hcfg, cache=True)
    assert same_items(hv, chv, 3) and same_items(ht, cht, 6)
    assert len(cht.pairs.items) == 6
    gcfg = GanDataConfig(size=32, synthetic_train=6, synthetic_val=3)
    (gt, gv), (cgt, cgv) = gan_datasets(gcfg, 1), gan_datasets(gcfg, 1, cache=True)
    assert same_items(gv, cgv, 3) and same_items(gt, cgt, 6)


def test_cache_that_cannot_fit_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(datacache, "available_memory", lambda: 10 * 2**20)  # 10 MiB free
    with pytest.raises(CacheTooLargeError, match="train.cache_data"):
        SampleCache(lambda i: np.zeros((512, 512, 3), np.uint8), range(100), enabled=True, name="photos")
    calls = []
    lazy = SampleCache(lambda i: calls.append(i) or i, range(5), enabled=False)
    assert [lazy(i) for i in (3, 3)] == [3, 3] and calls == [3, 3]  # off: loaded on every call
