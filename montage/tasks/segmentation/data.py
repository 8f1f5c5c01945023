"""Segmentation datasets: any registered source → resized, padded, augmented tensors."""

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
from montage.platform.masks import (
    DataFormatError,
    MaskCheck,
    MaskSource,
    Sample,
    build_mask_source,
    check_source_name,
    holdout_split,
)
from montage.platform.sampling import seed_for
from montage.platform.transforms import letterbox_ops, to_tensor_image

if TYPE_CHECKING:  # imported where a dataset is built (~0.7 s of CPU): serving and the CLI need not pay it
    import albumentations as A

log = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """Probabilities (and ranges) of the joint image+mask augmentations; 0 disables one."""

    hflip: float = 0.5
    rotate90: float = 0.0
    affine: float = 0.5
    scale: tuple[float, float] = (0.85, 1.15)
    rotate: float = 15.0  # degrees, ±
    translate: float = 0.05  # fraction of the size, ±
    brightness_contrast: float = 0.3
    hue_saturation: float = 0.3
    blur: float = 0.1


@dataclass
class SegDataConfig(DataSamplingConfig):
    """Where the person masks come from (``source``: coco | supervisely | folder | synthetic).

    coco: ``images`` dir + ``annotations`` JSON; supervisely: ``images`` = project root;
    folder: ``images`` + ``masks`` dirs. Without ``val_*`` paths, ``val_fraction`` of the
    training source is held out (seeded).
    """

    source: str = "synthetic"
    images: str = ""
    annotations: str = ""
    masks: str = ""
    val_images: str = ""
    val_annotations: str = ""
    val_masks: str = ""
    val_fraction: float = 0.1
    classes: list[str] = field(default_factory=list)  # supervisely: person class titles; empty = any '*person*'
    keep_negatives: bool = False  # coco: keep images without persons
    crowd: Literal["ignore", "foreground", "background"] = "ignore"  # coco iscrowd regions
    size: int = 256  # model resolution (long side resized, then padded to size×size)
    trimap_band: int = 3  # evaluation: px either side of the true boundary for the trimap metrics
    synthetic_train: int = 512
    synthetic_val: int = 64
    seed: int = 0
    on_error: Literal["raise", "skip"] = "raise"  # a corrupt sample: fail naming it, or warn and skip
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size < 32 or self.size % 32:
            raise ValueError(f"size must be a multiple of 32 (>= 32), got {self.size}")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1)")
        check_source_name(self.source)


def build_transform(aug: AugmentConfig | None, seed: int | None = None) -> A.Compose:
    """Joint geometric + photometric augmentation of a letterboxed sample (training); none for
    evaluation."""
    import albumentations as A

    ops: list[A.BasicTransform] = []
    if aug is not None:
        ops += [
            A.HorizontalFlip(p=aug.hflip),
            A.RandomRotate90(p=aug.rotate90),
            A.Affine(
                scale=tuple(aug.scale),
                rotate=(-aug.rotate, aug.rotate),
                translate_percent=(-aug.translate, aug.translate),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=aug.affine,
            ),
            A.RandomBrightnessContrast(p=aug.brightness_contrast),
            A.HueSaturationValue(p=aug.hue_saturation),
            A.GaussianBlur(blur_limit=(3, 5), p=aug.blur),
        ]
        ops = [op for op in ops if op.p > 0]
    return A.Compose(ops, mask_interpolation=cv2.INTER_LINEAR, seed=seed)


class SegmentationDataset(Dataset):
    """Yields ``{"image": (3,S,S), "mask": (1,S,S) alpha in [0,1], "valid": (1,S,S)}``.

    ``cache``: decode and letterbox the samples at ``indices`` (default all) once, up front.
    """

    def __init__(
        self,
        source: MaskSource,
        size: int,
        augment: AugmentConfig | None = None,
        on_error: str = "raise",
        seed: int | None = None,
        cache: bool = False,
        indices: list[int] | None = None,
    ) -> None:
        if len(source) == 0:
            raise ValueError("the data source is empty")
        self.source = source
        self.transform = build_transform(augment, seed)
        self.seed, self.epoch = seed or 0, 0
        self.on_error = on_error
        import albumentations as A

        self.letterbox = A.Compose(letterbox_ops(size), mask_interpolation=cv2.INTER_LINEAR)
        self.samples = SampleCache(
            self._letterboxed, range(len(source)) if indices is None else indices, cache, f"{type(source).__name__}"
        )

    def _letterboxed(self, i: int) -> Sample:
        image, alpha, valid = self._load(i)
        out = self.letterbox(image=image, masks=[alpha, valid])
        return out["image"], *out["masks"]

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        for attempt in range(min(len(self.source), 16)):
            j = (i + attempt) % len(self.source)
            try:
                return self.source.load(j)
            except (ImageError, DataFormatError, OSError, ValueError) as exc:
                if self.on_error == "raise":
                    raise ImageError(
                        f"bad sample {self.source.name(j)}: {exc} (data.on_error=skip to skip such samples)"
                    ) from exc
                log.warning("skipping bad sample %s: %s", self.source.name(j), exc)
        raise ImageError("too many consecutive bad samples; check the dataset")

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws are seeded per (seed, epoch, sample): resumable, the same on any number of workers."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, alpha, valid = self.samples(i)
        self.transform.set_random_seed(seed_for(self.seed, self.epoch, i))
        out = self.transform(image=image, masks=[alpha, valid])
        alpha_t, valid_t = out["masks"]
        return {
            "image": to_tensor_image(out["image"]),
            "mask": torch.from_numpy(np.ascontiguousarray(alpha_t)).float().div_(255).unsqueeze(0),
            "valid": torch.from_numpy(np.ascontiguousarray(valid_t)).float().unsqueeze(0),
        }


def build_source(cfg: SegDataConfig, split: str) -> MaskSource | None:
    """The source for ``split`` ("train" or "val"); None for val when it is carved from train."""
    val = split == "val"
    images = cfg.val_images if val else cfg.images
    if val and cfg.source != "synthetic" and not images:
        return None
    return build_mask_source(
        cfg.source,
        images,
        annotations=cfg.val_annotations if val else cfg.annotations,
        masks=cfg.val_masks if val else cfg.masks,
        classes=cfg.classes,
        keep_negatives=cfg.keep_negatives,
        crowd=cfg.crowd,
        count=cfg.synthetic_val if val else cfg.synthetic_train,
        size=cfg.size,
        seed=cfg.seed + (1 if val else 0),
    )


def build_datasets(cfg: SegDataConfig, cache: bool = False) -> tuple[Dataset, Dataset]:
    """Train and val datasets; ``cache``: each decodes and letterboxes its samples once, up front."""
    train_src = build_source(cfg, "train")
    val_src = build_source(cfg, "val")
    if val_src is not None:
        return (
            SegmentationDataset(train_src, cfg.size, cfg.augment, cfg.on_error, seed=cfg.seed, cache=cache),
            SegmentationDataset(val_src, cfg.size, None, cfg.on_error, cache=cache),
        )
    train_idx, val_idx = holdout_split(len(train_src), cfg.val_fraction, cfg.seed)
    train = SegmentationDataset(
        train_src, cfg.size, cfg.augment, cfg.on_error, seed=cfg.seed, cache=cache, indices=train_idx
    )
    val_ds = SegmentationDataset(train_src, cfg.size, None, cfg.on_error, cache=cache, indices=val_idx)
    return Subset(train, train_idx), Subset(val_ds, val_idx)


def build_cv_pool(cfg: SegDataConfig, cache: bool = False) -> tuple[Dataset, Dataset]:
    """The training source twice, index for index: augmented (training folds) and plain (validation fold)."""
    src = build_source(cfg, "train")
    return (
        SegmentationDataset(src, cfg.size, cfg.augment, cfg.on_error, seed=cfg.seed, cache=cache),
        SegmentationDataset(src, cfg.size, None, cfg.on_error, cache=cache),
    )


def check_sources(cfg: SegDataConfig) -> dict[str, MaskCheck]:
    """``montage data check``: the train and val sources (one ``all`` when val is held out of train)."""
    need = not cfg.keep_negatives
    train, val = build_source(cfg, "train"), build_source(cfg, "val")
    if val is None:
        return {"all": MaskCheck(train, need)}
    return {"train": MaskCheck(train, need), "val": MaskCheck(val, need)}
