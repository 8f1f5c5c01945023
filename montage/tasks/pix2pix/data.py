"""pix2pix data: CatFLW preparation, aligned A/B folders, synthetic landmark faces.

Prepared layout (``montage data catflw``), also the generic aligned layout::

    <out>/<split>/A/<name>.png   heatmap (1 channel; .npy for multi-channel heatmaps)
    <out>/<split>/B/<name>.png   face
    <out>/<split>/landmarks/<name>.json   landmarks in the prepared image's pixels
    <out>/report.json            counts and the files rejected, with the reason
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from montage.core.sections import DataSamplingConfig
from montage.platform.datacache import SampleCache
from montage.platform.imaging import IMAGE_SUFFIXES, ImageError, read_image, write_image

log = logging.getLogger(__name__)

N_LANDMARKS = 48


@dataclass
class GanDataConfig(DataSamplingConfig):
    source: Literal["synthetic", "aligned"] = "synthetic"
    root: str = ""  # aligned: <root>/{train,val}/{A,B}
    size: int = 256
    sigma: float = 3.5  # heatmap Gaussian σ in pixels at ``size`` (synthetic data)
    synthetic_train: int = 512
    synthetic_val: int = 64
    seed: int = 0
    hflip: float = 0.0  # off by default: a flip swaps left/right landmarks

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size < 16:
            raise ValueError("size must be >= 16")


# ------------------------------------------------------------------------------- heatmaps


def render_heatmaps(points: np.ndarray, size: int, sigma: float, channels: int = 1) -> np.ndarray:
    """(N, 2) landmark [x, y] pixels → float32 (channels, size, size) Gaussian peaks in [0, 1];
    one channel = the max over landmarks, ``channels == N`` = one map per landmark."""
    if channels not in (1, len(points)):
        raise ValueError(f"channels must be 1 or the number of landmarks ({len(points)}), got {channels}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    maps = np.exp(
        -((xx[None] - points[:, 0, None, None]) ** 2 + (yy[None] - points[:, 1, None, None]) ** 2) / (2 * sigma**2)
    )
    return maps.max(axis=0, keepdims=True).astype(np.float32) if channels == 1 else maps.astype(np.float32)


# -------------------------------------------------------------------------------- CatFLW


class AnnotationError(ValueError):
    """One CatFLW annotation cannot be used; the message says why."""


def parse_catflw(ann: Any, n: int = N_LANDMARKS) -> tuple[np.ndarray, np.ndarray]:
    """CatFLW JSON → (landmarks (n, 2), box [x1, y1, x2, y2])."""
    if not isinstance(ann, dict) or "labels" not in ann or "bounding_boxes" not in ann:
        raise AnnotationError("JSON needs 'labels' and 'bounding_boxes'")
    try:
        pts = np.asarray(ann["labels"], dtype=np.float64)
        box = np.asarray(ann["bounding_boxes"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise AnnotationError(f"non-numeric labels or bounding box: {exc}") from exc
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise AnnotationError(f"'labels' must be a list of [x, y], got shape {pts.shape}")
    if len(pts) != n:
        raise AnnotationError(f"expected {n} landmarks, got {len(pts)}")
    if box.shape != (4,) or box[2] <= box[0] or box[3] <= box[1]:
        raise AnnotationError(f"'bounding_boxes' must be [x1, y1, x2, y2] with x2 > x1, y2 > y1, got {box.tolist()}")
    if not np.isfinite(pts).all():
        raise AnnotationError("landmarks contain NaN/inf")
    return pts, box


def crop_face(
    image: np.ndarray, pts: np.ndarray, box: np.ndarray, size: int, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Crop the box grown by ``margin`` (fraction of its size, clipped to the image), resize
    to size×size and map the landmarks into the crop's pixels."""
    h, w = image.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    x1, y1 = max(0.0, box[0] - margin * bw), max(0.0, box[1] - margin * bh)
    x2, y2 = min(float(w), box[2] + margin * bw), min(float(h), box[3] + margin * bh)
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise AnnotationError(f"bounding box {box.tolist()} lies outside the {w}x{h} image")
    outside = (pts[:, 0] < x1) | (pts[:, 0] > x2) | (pts[:, 1] < y1) | (pts[:, 1] > y2)
    if outside.any():
        raise AnnotationError(
            f"{int(outside.sum())} landmark(s) outside the face box, e.g. #{int(np.argmax(outside))} at "
            f"{pts[outside][0].tolist()}"
        )
    ix1, iy1, ix2, iy2 = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
    crop = image[iy1:iy2, ix1:ix2]
    face = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR)
    sx, sy = size / (ix2 - ix1), size / (iy2 - iy1)
    # pixel centres: x_new + 0.5 = (x - ix1 + 0.5) · s
    mapped = np.stack([(pts[:, 0] - ix1 + 0.5) * sx - 0.5, (pts[:, 1] - iy1 + 0.5) * sy - 0.5], axis=1)
    return face, mapped


def _find_annotation(image: Path, src: Path) -> Path | None:
    for cand in (
        image.with_suffix(".json"),
        image.parent / f"{image.name}.json",
        image.parent.parent / "labels" / f"{image.stem}.json",
        src / "labels" / f"{image.stem}.json",
    ):
        if cand.is_file():
            return cand
    return None


def read_catflw(path: Path, src: Path, size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """One CatFLW image and its annotation → (face crop size×size, landmarks in the crop's pixels)."""
    ann_path = _find_annotation(path, src)
    if ann_path is None:
        raise AnnotationError(f"{path}: no JSON annotation found")
    try:
        ann = json.loads(ann_path.read_text())
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"malformed JSON {ann_path.name}: {exc}") from exc
    pts, box = parse_catflw(ann)
    return crop_face(read_image(path), pts, box, size, margin)


def prepare_catflw(
    src: str | Path,
    out: str | Path,
    size: int = 256,
    sigma: float = 3.5,
    seed: int = 0,
    channels: int = 1,
    margin: float = 0.1,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, Any]:
    """Prepare CatFLW into aligned A/B pairs; returns (and writes) a report of what was done."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"CatFLW folder not found: {src}")
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images under {src}")
    good: list[tuple[str, np.ndarray, np.ndarray]] = []
    rejected: dict[str, str] = {}
    for path in images:
        rel = str(path.relative_to(src))
        try:
            face, mapped = read_catflw(path, src, size, margin)
            good.append((path.stem, face, mapped))
        except (AnnotationError, ImageError) as exc:
            rejected[rel] = str(exc)
            log.warning("skipped %s: %s", rel, exc)
    order = np.random.default_rng(seed).permutation(len(good))
    n_train = int(round(splits[0] * len(good)))
    n_val = int(round(splits[1] * len(good)))
    assignment = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    counts = {}
    for split, idx in assignment.items():
        for i in idx:
            name, face, mapped = good[int(i)]
            heat = render_heatmaps(mapped, size, sigma, channels)
            base = out / split
            if channels == 1:
                write_image(base / "A" / f"{name}.png", (heat[0] * 255).round().astype(np.uint8))
            else:
                (base / "A").mkdir(parents=True, exist_ok=True)
                np.save(base / "A" / f"{name}.npy", (heat * 255).round().astype(np.uint8))
            write_image(base / "B" / f"{name}.png", face)
            (base / "landmarks").mkdir(parents=True, exist_ok=True)
            (base / "landmarks" / f"{name}.json").write_text(
                json.dumps({"labels": mapped.round(3).tolist(), "size": size})
            )
        counts[split] = len(idx)
    report = {
        "source": str(src),
        "written": counts,
        "rejected": rejected,
        "size": size,
        "sigma": sigma,
        "channels": channels,
        "seed": seed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- synthetic


def synthetic_landmarks(rng: np.random.Generator, size: int) -> np.ndarray:
    """48 cat-face-like landmarks: 16 on the face outline (0–15), 2×6 around the eyes (16–27),
    4 per ear (28–35), nose (36–38), mouth (39–41), whisker roots (42–47); jittered and posed."""
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    outline = np.stack([np.cos(t) * 0.38, np.sin(t) * 0.32 + 0.05], 1)
    eye = lambda cx: np.stack(
        [
            cx + np.cos(np.linspace(0, 2 * np.pi, 6, endpoint=False)) * 0.07,
            -0.02 + np.sin(np.linspace(0, 2 * np.pi, 6, endpoint=False)) * 0.04,
        ],
        1,
    )  # noqa: E731
    ears = np.array(
        [
            [-0.34, -0.2],
            [-0.3, -0.48],
            [-0.12, -0.27],
            [-0.24, -0.32],
            [0.34, -0.2],
            [0.3, -0.48],
            [0.12, -0.27],
            [0.24, -0.32],
        ]
    )
    nose_mouth = np.array([[0, 0.1], [-0.04, 0.08], [0.04, 0.08], [0, 0.17], [-0.07, 0.2], [0.07, 0.2]])
    whiskers = np.array([[-0.12, 0.12], [-0.13, 0.15], [-0.12, 0.18], [0.12, 0.12], [0.13, 0.15], [0.12, 0.18]])
    pts = np.concatenate([outline, eye(-0.15), eye(0.15), ears, nose_mouth, whiskers])
    pts = pts + rng.normal(0, 0.01, pts.shape)
    angle = rng.uniform(-0.25, 0.25)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05, 2)
    return ((pts + 0.5) * size).astype(np.float64)


def draw_face(pts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A cartoon cat face through the landmarks (the synthetic target image). Colours vary
    a little per sample; the shape, which the heatmap determines, carries the signal."""
    bg = np.array([90.0, 110.0, 140.0]) + rng.normal(0, 6, 3)
    img = np.ones((size, size, 3), np.float32) * bg
    fur = (np.array([205.0, 140.0, 80.0]) + rng.normal(0, 10, 3)).tolist()
    ip = lambda a: np.round(a).astype(np.int32)  # noqa: E731
    for ear in (pts[28:31], pts[32:35]):  # outer base, tip, inner base
        cv2.fillPoly(img, [ip(ear)], fur)
    cv2.fillPoly(img, [ip(pts[:16])], fur)
    for eye in (pts[16:22], pts[22:28]):
        cv2.fillPoly(img, [ip(eye)], (90, 170, 60))
        c = eye.mean(0)
        cv2.circle(img, tuple(ip(c)), max(1, size // 64), (10, 10, 10), -1)
    cv2.fillPoly(img, [ip(pts[36:39])], (200, 110, 130))  # nose
    cv2.polylines(img, [ip(pts[[40, 39, 41]])], False, (20, 20, 20), max(1, size // 128))  # mouth
    for w in range(6):
        root = pts[42 + w]
        tip = root + np.array([-1 if w < 3 else 1, (w % 3 - 1) * 0.4]) * size * 0.2
        cv2.line(img, tuple(ip(root)), tuple(ip(tip)), (235, 235, 235), 1)
    return np.clip(img, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------- datasets


def to_tanh(x: np.ndarray) -> torch.Tensor:
    """uint8 HxW or HxWxC → float (C, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(127.5).sub_(1)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


class SyntheticFaces(Dataset):
    """Drawn cat faces and their landmark heatmaps, a fixed pair per (seed, index)."""

    def __init__(self, count: int, size: int, sigma: float, seed: int, channels: int = 1, cache: bool = False) -> None:
        self.count, self.size, self.sigma, self.seed, self.channels = count, size, sigma, seed, channels
        self.pairs = SampleCache(self._draw, range(count), cache, "SyntheticFaces")

    def __len__(self) -> int:
        return self.count

    def _draw(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, i])
        pts = synthetic_landmarks(rng, self.size)
        return render_heatmaps(pts, self.size, self.sigma, self.channels), draw_face(pts, self.size, rng), pts

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """``a`` heatmaps and ``b`` face in [-1, 1]; ``landmarks`` (48, 2) [x, y] pixels (for the baselines)."""
        heat, face, pts = self.pairs(i)
        return {"a": torch.from_numpy(heat) * 2 - 1, "b": to_tanh(face), "landmarks": torch.from_numpy(pts).float()}


class AlignedPairs(Dataset):
    """``<root>/<split>/A/<name>.(png|npy)`` ↔ ``<root>/<split>/B/<name>.png``, resized to ``size``."""

    def __init__(
        self, root: str | Path, split: str, size: int, hflip: float = 0.0, cache: bool = False, seed: int = 0
    ) -> None:
        base = Path(root) / split
        if not (base / "A").is_dir() or not (base / "B").is_dir():
            raise FileNotFoundError(f"aligned pairs need {base}/A and {base}/B")
        b_files = {p.stem: p for p in (base / "B").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        self.pairs = [(a, b_files[a.stem]) for a in sorted((base / "A").iterdir()) if a.stem in b_files]
        if not self.pairs:
            raise FileNotFoundError(f"no A/B pairs with matching names in {base}")
        self.size, self.hflip, self.seed, self.epoch = size, hflip, seed, 0
        self.samples = SampleCache(self._decoded, range(len(self.pairs)), cache, f"{base} pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def _resize(self, x: np.ndarray) -> np.ndarray:
        return (
            x
            if x.shape[:2] == (self.size, self.size)
            else cv2.resize(x, (self.size, self.size), interpolation=cv2.INTER_AREA)
        )

    def _decoded(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a_path, b_path = self.pairs[i]
        if a_path.suffix == ".npy":
            a = np.load(a_path, allow_pickle=False)  # (C, H, W) uint8
            a = np.stack([self._resize(c) for c in a], axis=2)
        else:
            a = self._resize(read_image(a_path, mode="unchanged"))
        return a, self._resize(read_image(b_path))

    def set_epoch(self, epoch: int) -> None:
        """Flips are drawn per (seed, epoch, sample): resumable, the same on any number of workers."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = self.samples(i)
        if self.hflip and np.random.default_rng([self.seed, self.epoch, i]).random() < self.hflip:
            a, b = a[:, ::-1], b[:, ::-1]
        return {"a": to_tanh(a), "b": to_tanh(b)}


def build_datasets(cfg: GanDataConfig, channels: int, cache: bool = False) -> tuple[Dataset, Dataset]:
    """Train and val datasets; ``cache``: each decodes and resizes its pairs once, up front."""
    if cfg.source == "synthetic":
        return (
            SyntheticFaces(cfg.synthetic_train, cfg.size, cfg.sigma, cfg.seed, channels, cache=cache),
            SyntheticFaces(cfg.synthetic_val, cfg.size, cfg.sigma, cfg.seed + 1, channels, cache=cache),
        )
    return AlignedPairs(cfg.root, "train", cfg.size, cfg.hflip, cache=cache, seed=cfg.seed), AlignedPairs(
        cfg.root, "val", cfg.size, cache=cache
    )


def build_cv_pool(cfg: GanDataConfig, channels: int, cache: bool = False) -> tuple[Dataset, Dataset]:
    """The training pairs twice, index for index: as trained (flips) and plain (validation fold)."""
    if cfg.source == "synthetic":
        faces = SyntheticFaces(cfg.synthetic_train, cfg.size, cfg.sigma, cfg.seed, channels, cache=cache)
        return faces, faces
    return (
        AlignedPairs(cfg.root, "train", cfg.size, cfg.hflip, cache=cache, seed=cfg.seed),
        AlignedPairs(cfg.root, "train", cfg.size, cache=cache),
    )


def catflw_command(argv: list[str]) -> int:
    """``montage data catflw --src DIR --out DIR [--size 256 --sigma 3.5 --seed 0 --channels 1]``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="montage data catflw",
        description="Prepare CatFLW as aligned heatmap (A) / face (B) pairs, split 80/10/10.",
    )
    p.add_argument("--src", required=True, help="CatFLW folder: images with a JSON each (labels, bounding_boxes)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--sigma", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--channels",
        type=int,
        default=1,
        choices=[1, N_LANDMARKS],
        help="1 combined heatmap, or one per landmark (.npy)",
    )
    p.add_argument("--margin", type=float, default=0.1, help="grow the face box by this fraction on each side")
    args = p.parse_args(argv)
    report = prepare_catflw(args.src, args.out, args.size, args.sigma, args.seed, args.channels, args.margin)
    for name, reason in report["rejected"].items():
        print(f"rejected {name}: {reason}")
    w = report["written"]
    print(
        f"wrote train {w['train']} / val {w['val']} / test {w['test']} pairs to {args.out}; rejected "
        f"{len(report['rejected'])} (see report.json)"
    )
    return 0
