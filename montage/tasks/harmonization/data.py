"""Harmonization pairs: (composite, mask) → real image, the dataset and its configuration.

Sources (``data.source``; the readers and the perturbations are in :mod:`montage.tasks.harmonization.sources`):
- ``iharmony4``: ``<root>/<subset>/{composite_images,masks,real_images}`` with
  ``<subset>_train.txt`` / ``<subset>_test.txt`` lists, several subsets at once.
- ``masks``: any image + person-mask source the segmentation task reads (COCO, Supervisely,
  folder); the foreground of the real image is perturbed to make the composite.
- ``cutouts``: RGBA cut-outs pasted on background photos at random scale and position.
- ``synthetic``: seeded synthetic persons in scenes lit as a whole (see :class:`SyntheticPairs`).
Perturbations follow iHarmony4's recipe: colour transfer from another image, brightness /
contrast / gamma / hue / saturation / white balance, applied inside the mask only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from montage.core.sections import DataSamplingConfig
from montage.platform.datacache import SampleCache
from montage.platform.imaging import ImageError
from montage.platform.masks import build_mask_source, check_source_name, holdout_split
from montage.platform.sampling import seed_for
from montage.platform.transforms import letterbox_ops, to_tensor_image
from montage.tasks.harmonization.sources import (
    IHARMONY4_SUBSETS,
    CutoutsOnBackgrounds,
    IHarmony4,
    PairSource,
    PerturbConfig,
    PerturbedMasks,
    SyntheticPairs,
    Triple,
)

if TYPE_CHECKING:  # imported where a dataset is built (~0.7 s of CPU): serving and the CLI need not pay it
    import albumentations as A

log = logging.getLogger(__name__)


@dataclass
class HarmDataConfig(DataSamplingConfig):
    source: Literal["synthetic", "iharmony4", "masks", "cutouts"] = "synthetic"
    root: str = ""  # iharmony4 root, or the cut-out folder
    subsets: list[str] = field(default_factory=lambda: list(IHARMONY4_SUBSETS))
    backgrounds: str = ""  # cutouts: folder of background photos
    mask_source: str = "folder"  # masks: any mask source (coco | supervisely | folder | synthetic: synthetic_train)
    images: str = ""
    annotations: str = ""
    masks: str = ""
    classes: list[str] = field(default_factory=list)  # masks=supervisely: person class titles; empty = any '*person*'
    keep_negatives: bool = False  # masks=coco: keep images without persons
    crowd: Literal["ignore", "foreground", "background"] = "ignore"  # masks=coco: iscrowd regions
    size: int = 256
    synthetic_train: int = 512
    synthetic_val: int = 64
    val_fraction: float = 0.1
    seed: int = 0
    hflip: float = 0.5
    affine: float = 0.3
    perturb: PerturbConfig = field(default_factory=PerturbConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size < 16 or self.size % 16:
            raise ValueError(f"size must be a multiple of 16, got {self.size}")
        unknown = [s for s in self.subsets if s not in IHARMONY4_SUBSETS]
        if unknown:
            raise ValueError(f"unknown iHarmony4 subsets {unknown}; valid: {', '.join(IHARMONY4_SUBSETS)}")
        check_source_name(self.mask_source, "data.mask_source")


# ----------------------------------------------------------------------------- dataset


class HarmonizationDataset(Dataset):
    """Yields ``{"composite": (3,S,S), "mask": (1,S,S), "target": (3,S,S)}`` in [0, 1].

    Generated pairs are seeded by (seed, index), so runs are reproducible and validation is
    the same every epoch; geometric augmentation (train only, seeded) moves composite, mask
    and target together.
    """

    def __init__(
        self,
        source: PairSource,
        size: int,
        seed: int,
        augment: tuple[float, float] | None = None,
        cache: bool = False,
        indices: list[int] | None = None,
    ) -> None:
        import albumentations as A

        self.source, self.seed = source, seed
        self.letterbox = A.Compose(
            letterbox_ops(size), additional_targets={"target": "image"}, mask_interpolation=cv2.INTER_LINEAR
        )
        ops: list[A.BasicTransform] = []  # augmentation of the letterboxed pair (training only)
        if augment is not None:
            hflip, affine = augment
            ops += [
                op
                for op in (
                    A.HorizontalFlip(p=hflip),
                    A.Affine(
                        scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=cv2.BORDER_CONSTANT, p=affine
                    ),
                )
                if op.p > 0
            ]
        self.transform = A.Compose(
            ops, additional_targets={"target": "image"}, mask_interpolation=cv2.INTER_LINEAR, seed=seed
        )
        self.train = augment is not None
        self.epoch = 0
        self.pairs = SampleCache(
            self._letterboxed, range(len(source)) if indices is None else indices, cache, type(source).__name__
        )

    def __len__(self) -> int:
        return len(self.source)

    def _letterboxed(self, i: int) -> Triple:
        rng = np.random.default_rng([self.seed, i])  # a fixed pair per index: reproducible runs
        try:
            comp, mask, target = self.source.load(i, rng)
        except (OSError, ValueError) as exc:
            raise ImageError(f"bad sample {self.source.name(i)}: {exc}") from exc
        out = self.letterbox(image=comp, mask=mask, target=target)
        return out["image"], out["mask"], out["target"]

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws are seeded per (seed, epoch, sample): resumable, the same on any number of workers."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        comp, mask, target = self.pairs(i)
        self.transform.set_random_seed(seed_for(self.seed, self.epoch, i))
        out = self.transform(image=comp, mask=mask, target=target)
        return {
            "composite": to_tensor_image(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(out["mask"])).float().div_(255).unsqueeze(0),
            "target": to_tensor_image(out["target"]),
        }


def pair_source(cfg: HarmDataConfig, split: str) -> PairSource:
    """The pair source of ``split`` ("train" or "val"; one source for both when val is held out)."""
    val = split == "val"
    if cfg.source == "synthetic":
        return SyntheticPairs(
            cfg.synthetic_val if val else cfg.synthetic_train, cfg.size, cfg.seed + (1 if val else 0), cfg.perturb
        )
    if cfg.source == "iharmony4":
        return IHarmony4(cfg.root, cfg.subsets, "test" if val else "train")
    if cfg.source == "cutouts":
        return CutoutsOnBackgrounds(
            cfg.root, cfg.backgrounds, cfg.synthetic_val if val else cfg.synthetic_train, cfg.perturb
        )
    masks = build_mask_source(
        cfg.mask_source,
        cfg.images,
        annotations=cfg.annotations,
        masks=cfg.masks,
        classes=cfg.classes,
        keep_negatives=cfg.keep_negatives,
        crowd=cfg.crowd,
        count=cfg.synthetic_train,  # mask_source=synthetic: the val_fraction held out of these
        size=cfg.size,
        seed=cfg.seed,
    )
    return PerturbedMasks(masks, cfg.perturb)


def build_datasets(cfg: HarmDataConfig, cache: bool = False) -> tuple[Dataset, Dataset]:
    """Train and val datasets; ``cache``: each builds and letterboxes its pairs once, up front."""
    aug = (cfg.hflip, cfg.affine)
    if cfg.source in ("synthetic", "iharmony4", "cutouts"):
        return (
            HarmonizationDataset(pair_source(cfg, "train"), cfg.size, cfg.seed, aug, cache=cache),
            HarmonizationDataset(pair_source(cfg, "val"), cfg.size, cfg.seed + 1, cache=cache),
        )
    src = pair_source(cfg, "train")  # one mask source: hold out a seeded fraction
    train_idx, val_idx = holdout_split(len(src), cfg.val_fraction, cfg.seed)
    return (
        Subset(HarmonizationDataset(src, cfg.size, cfg.seed, aug, cache=cache, indices=train_idx), train_idx),
        Subset(HarmonizationDataset(src, cfg.size, cfg.seed + 1, cache=cache, indices=val_idx), val_idx),
    )


def build_cv_pool(cfg: HarmDataConfig, cache: bool = False) -> tuple[Dataset, Dataset]:
    """The training pairs twice, index for index: augmented (training folds) and plain (validation fold)."""
    src = pair_source(cfg, "train")
    return (
        HarmonizationDataset(src, cfg.size, cfg.seed, (cfg.hflip, cfg.affine), cache=cache),
        HarmonizationDataset(src, cfg.size, cfg.seed + 1, cache=cache),
    )
