"""Person-mask sources: COCO instances, Supervisely Persons, image+mask folders, synthetic.

A source is a sequence of samples; ``load(i)`` returns ``(image RGB uint8 (H, W, 3),
alpha uint8 (H, W) in 0..255, valid uint8 (H, W) in {0, 1})`` where ``valid == 0`` marks
pixels no loss or metric should count (COCO crowd regions). ``name(i)`` identifies the
sample in error messages. Sources are registered by name and built from the data config.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from pathlib import Path
from typing import Any, Callable, Protocol

import cv2
import numpy as np

from montage.core.registry import Registry
from montage.platform.imaging import ImageError, decode_image, list_images, read_image, read_mask

log = logging.getLogger(__name__)

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


class MaskSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, i: int) -> Sample: ...

    def name(self, i: int) -> str: ...


SOURCES: Registry[Callable[..., MaskSource]] = Registry("mask source")


class DataFormatError(ValueError):
    """An annotation file does not follow its format; the message names the file."""


# ------------------------------------------------------------------------------- COCO


class CocoPersons:
    """COCO instances JSON filtered to the ``person`` category.

    The mask is the union of the image's non-crowd person instances (polygons or RLE via
    pycocotools ``annToMask``). Crowd regions (``iscrowd=1``) are ``crowd``: ``ignore``
    (valid = 0), ``foreground`` or ``background``. Images without persons are kept as
    negatives only when ``keep_negatives``.
    """

    def __init__(
        self,
        images: str,
        annotations: str,
        keep_negatives: bool = False,
        crowd: str = "ignore",
        category: str = "person",
    ) -> None:
        from pycocotools.coco import COCO

        ann_path = Path(annotations)
        if not ann_path.is_file():
            raise FileNotFoundError(f"COCO annotations not found: {ann_path}")
        if crowd not in ("ignore", "foreground", "background"):
            raise ValueError(f"crowd must be ignore, foreground or background, got {crowd!r}")
        try:
            self.coco = COCO(str(ann_path))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataFormatError(f"{ann_path}: not a COCO instances file: {exc}") from exc
        cat_ids = self.coco.getCatIds(catNms=[category])
        if not cat_ids:
            raise DataFormatError(f"{ann_path}: no '{category}' category")
        self.cat_ids = cat_ids
        with_persons = set(self.coco.getImgIds(catIds=cat_ids))
        ids = sorted(self.coco.getImgIds()) if keep_negatives else sorted(with_persons)
        self.ids = ids
        self.root = Path(images)
        self.crowd = crowd

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, i: int) -> str:
        return str(self.root / self.coco.loadImgs(self.ids[i])[0]["file_name"])

    def masks(self, img_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(person mask, crowd mask) as uint8 {0, 1} at the image's annotated size."""
        info = self.coco.loadImgs(img_id)[0]
        h, w = info["height"], info["width"]
        person = np.zeros((h, w), np.uint8)
        crowd = np.zeros((h, w), np.uint8)
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, catIds=self.cat_ids, iscrowd=None)):
            m = self.coco.annToMask(ann)
            if ann.get("iscrowd", 0):
                crowd |= m
            else:
                person |= m
        return person, crowd

    def load(self, i: int) -> Sample:
        img_id = self.ids[i]
        image = read_image(self.name(i))
        person, crowd = self.masks(img_id)
        if person.shape != image.shape[:2]:
            raise ImageError(
                f"{self.name(i)}: image is {image.shape[1]}x{image.shape[0]} but COCO says "
                f"{person.shape[1]}x{person.shape[0]}"
            )
        valid = np.ones_like(person)
        if self.crowd == "ignore":
            valid[crowd > 0] = 0
        elif self.crowd == "foreground":
            person |= crowd
        return image, person * 255, valid


# ------------------------------------------------------------------------ Supervisely


def decode_supervisely_bitmap(data: str) -> np.ndarray:
    """Supervisely bitmap ``data``: base64 → zlib → PNG; mask = alpha (RGBA) or non-zero."""
    try:
        png = zlib.decompress(base64.b64decode(data))
    except (ValueError, zlib.error) as exc:
        raise DataFormatError(f"bitmap data is not base64+zlib: {exc}") from exc
    arr = decode_image(png, what="bitmap PNG", mode="unchanged")
    if arr.ndim == 3:
        arr = arr[..., 3] if arr.shape[2] == 4 else arr.max(axis=2)
    return (arr > 0).astype(np.uint8)


def rasterize_supervisely(
    ann: dict[str, Any], is_person: Callable[[str], bool], where: str = "annotation"
) -> np.ndarray:
    """Union of the person objects of one Supervisely annotation → uint8 {0, 1} mask."""
    try:
        h, w = int(ann["size"]["height"]), int(ann["size"]["width"])
        objects = ann["objects"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataFormatError(f"{where}: missing size/objects: {exc}") from exc
    mask = np.zeros((h, w), np.uint8)
    for obj in objects:
        if not is_person(obj.get("classTitle", "")):
            continue
        kind = obj.get("geometryType")
        if kind == "bitmap":
            bmp = decode_supervisely_bitmap(obj["bitmap"]["data"])
            x0, y0 = (int(v) for v in obj["bitmap"]["origin"])
            bh, bw = bmp.shape
            ys, xs = slice(max(0, y0), min(h, y0 + bh)), slice(max(0, x0), min(w, x0 + bw))
            mask[ys, xs] |= bmp[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        elif kind == "polygon":
            pts = obj["points"]
            poly = np.zeros((h, w), np.uint8)
            cv2.fillPoly(poly, [np.round(np.asarray(pts["exterior"], np.float64)).astype(np.int32)], 1)
            for hole in pts.get("interior", []):
                if len(hole) >= 3:
                    cv2.fillPoly(poly, [np.round(np.asarray(hole, np.float64)).astype(np.int32)], 0)
            mask |= poly
        else:
            log.debug("%s: skipping %s object", where, kind)
    return mask


class SuperviselyPersons:
    """A Supervisely project: ``<root>/<dataset>/img/<name>`` + ``<root>/<dataset>/ann/<name>.json``.

    Objects whose class is in ``classes`` (default: any class title containing "person")
    are rasterised: bitmaps at their ``origin``, polygons with interior holes cut out.
    """

    def __init__(self, root: str, classes: list[str] | None = None) -> None:
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"Supervisely project not found: {root_path}")
        self.items: list[tuple[Path, Path]] = []
        for ann_dir in sorted(root_path.glob("*/ann")):
            img_dir = ann_dir.parent / "img"
            for ann in sorted(ann_dir.glob("*.json")):
                self.items.append((img_dir / ann.name[: -len(".json")], ann))
        if not self.items:
            raise DataFormatError(f"{root_path}: no <dataset>/ann/*.json files")
        wanted = set(classes or [])
        self.is_person = (lambda t: t in wanted) if wanted else (lambda t: "person" in t.lower())

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return str(self.items[i][0])

    def load(self, i: int) -> Sample:
        img_path, ann_path = self.items[i]
        try:
            ann = json.loads(ann_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{ann_path}: invalid JSON: {exc}") from exc
        mask = rasterize_supervisely(ann, self.is_person, str(ann_path))
        image = read_image(img_path)
        if image.shape[:2] != mask.shape:
            raise ImageError(
                f"{img_path}: image is {image.shape[1]}x{image.shape[0]}, annotation says "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
        return image, mask * 255, np.ones_like(mask)


# ----------------------------------------------------------------------------- folder


class ImageMaskFolder:
    """``images/<stem>.<ext>`` with ``masks/<stem>.png`` (grey or RGBA alpha; 0..255 alpha kept)."""

    def __init__(self, images: str, masks: str) -> None:
        self.images = list_images(images)
        mask_dir = Path(masks)
        if not mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder not found: {mask_dir}")
        by_stem = {p.stem: p for p in list_images(mask_dir)}
        missing = [p.name for p in self.images if p.stem not in by_stem]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) without a mask in {mask_dir}, e.g. {missing[:3]}")
        self.masks = [by_stem[p.stem] for p in self.images]
        if not self.images:
            raise FileNotFoundError(f"no images in {images}")

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return str(self.images[i])

    def load(self, i: int) -> Sample:
        image = read_image(self.images[i])
        alpha = read_mask(self.masks[i])
        if alpha.shape != image.shape[:2]:
            raise ImageError(
                f"{self.masks[i]}: mask is {alpha.shape[1]}x{alpha.shape[0]}, image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return image, alpha, np.ones_like(alpha)


# -------------------------------------------------------------------------- synthetic


def textured_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Gradient + blurred noise + a few random rectangles and circles."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / max(h, w)
    t = (t - t.min()) / max(1e-6, t.max() - t.min())
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    noise = cv2.GaussianBlur(rng.normal(0, 25, (h, w, 3)).astype(np.float32), (0, 0), max(1.0, h / 32))
    img = img + noise
    for _ in range(rng.integers(2, 6)):
        colour = rng.uniform(0, 255, 3).tolist()
        if rng.random() < 0.5:
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            cv2.rectangle(
                img,
                (int(x0), int(y0)),
                (int(x0 + rng.integers(4, w // 2 + 5)), int(y0 + rng.integers(4, h // 2 + 5))),
                colour,
                -1,
            )
        else:
            cv2.circle(
                img,
                (int(rng.integers(0, w)), int(rng.integers(0, h))),
                int(rng.integers(3, max(4, h // 5))),
                colour,
                -1,
            )
    return np.clip(img, 0, 255).astype(np.uint8)


def person_blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A person-like silhouette (head, torso, arms, legs) as uint8 {0, 1}."""
    mask = np.zeros((h, w), np.uint8)
    s = rng.uniform(0.55, 0.95) * h  # person height
    cx = rng.uniform(0.3, 0.7) * w
    top = rng.uniform(0.02, max(0.03, 1 - s / h)) * h
    head_r = s * 0.09
    head = (int(cx), int(top + head_r))
    cv2.circle(mask, head, max(2, int(head_r)), 1, -1)
    neck = top + 2 * head_r
    torso_h, torso_w = s * 0.38, s * rng.uniform(0.16, 0.24)
    cv2.ellipse(
        mask, (int(cx), int(neck + torso_h / 2)), (max(2, int(torso_w / 2)), max(2, int(torso_h / 2))), 0, 0, 360, 1, -1
    )
    limb = max(2, int(s * 0.06))
    shoulder = neck + torso_h * 0.15
    for side in (-1, 1):
        hand = (int(cx + side * torso_w * rng.uniform(0.8, 1.6)), int(shoulder + s * rng.uniform(0.15, 0.35)))
        cv2.line(mask, (int(cx + side * torso_w * 0.4), int(shoulder)), hand, 1, limb)
        hip = neck + torso_h * 0.9
        foot = (int(cx + side * torso_w * rng.uniform(0.2, 0.8)), int(min(h - 1, top + s)))
        cv2.line(mask, (int(cx + side * torso_w * 0.25), int(hip)), foot, 1, int(limb * 1.3))
    return mask


class SyntheticPersons:
    """Seeded person-like blobs on textured backgrounds; sample ``i`` is always the same."""

    def __init__(self, count: int, size: int = 64, seed: int = 0) -> None:
        if count < 1:
            raise ValueError("synthetic count must be >= 1")
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return f"synthetic[{self.seed}:{i}]"

    def load(self, i: int) -> Sample:
        rng = np.random.default_rng([self.seed, i])
        s = self.size
        image = textured_background(rng, s, s)
        mask = person_blob(rng, s, s)
        person = textured_background(rng, s, s)
        tint = rng.uniform(0.4, 1.0, 3)  # clothes/skin-ish colours that differ from the background
        person = np.clip(person * tint + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)
        soft = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.7)
        image = (person * soft[..., None] + image * (1 - soft[..., None])).astype(np.uint8)
        return image, (soft * 255).round().astype(np.uint8), np.ones((s, s), np.uint8)


SOURCES.register("coco")(CocoPersons)
SOURCES.register("supervisely")(SuperviselyPersons)
SOURCES.register("folder")(ImageMaskFolder)
SOURCES.register("synthetic")(SyntheticPersons)


def build_mask_source(
    kind: str,
    images: str = "",
    *,
    annotations: str = "",
    masks: str = "",
    classes: list[str] | None = None,
    keep_negatives: bool = False,
    crowd: str = "ignore",
    count: int = 0,
    size: int = 64,
    seed: int = 0,
) -> MaskSource:
    """A registered mask source from the fields a task's data config holds (every task builds its
    person masks through here): ``coco`` uses annotations, keep_negatives, crowd; ``supervisely``
    classes; ``folder`` masks; ``synthetic`` count, size, seed; any other registered source
    gets ``images``."""
    factory = SOURCES.get(kind)
    if kind == "synthetic":
        return factory(count, size=size, seed=seed)
    if not images:
        raise ValueError(f"data.images must be set for source '{kind}'")
    if kind == "coco":
        return factory(images, annotations, keep_negatives=keep_negatives, crowd=crowd)
    if kind == "supervisely":
        return factory(images, classes=list(classes or []))
    if kind == "folder":
        return factory(images, masks)
    return factory(images)


def check_source_name(kind: str, key: str = "data.source") -> None:
    """Fail at config load, naming the valid sources, instead of inside a Ray worker."""
    if kind not in SOURCES:
        raise ValueError(f"{key}: unknown mask source '{kind}'; valid: {', '.join(SOURCES.names())}")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists holding out ``fraction`` of ``n`` samples (at least one)
    for validation: the same split on every rank, every run with that seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise ValueError(f"only {n} samples: too few to hold out a validation split of {fraction:g}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    return order[n_val:], order[:n_val]


class MaskCheck:
    """A mask source as a :class:`~montage.platform.datacheck.CheckSource` (``montage data check``):
    the image with its alpha; ``needs_foreground``: an empty mask rejects the sample."""

    def __init__(self, source: MaskSource, needs_foreground: bool = True) -> None:
        self.source, self.needs_foreground = source, needs_foreground

    def __len__(self) -> int:
        return len(self.source)

    def name(self, i: int) -> str:
        return self.source.name(i)

    def probe(self, i: int) -> Any:
        from montage.platform.datacheck import Probe

        image, alpha, _ = self.source.load(i)
        return Probe(image, alpha, needs_foreground=self.needs_foreground)
