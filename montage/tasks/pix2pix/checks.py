"""pix2pix data checks (``montage data check pix2pix``): synthetic faces, aligned A/B folders, raw CatFLW."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from montage.platform.datacheck import Probe
from montage.platform.imaging import IMAGE_SUFFIXES
from montage.tasks.pix2pix.data import AlignedPairs, GanDataConfig, SyntheticFaces, read_catflw, render_heatmaps


def _heat_u8(a: np.ndarray) -> np.ndarray:
    return (a.max(axis=2) if a.ndim == 3 else a).astype(np.uint8)


class CatflwCheck:
    """Raw CatFLW (images with JSON annotations) as a check source: the face crop that
    ``montage data catflw`` would write, its landmark heatmap overlaid."""

    def __init__(self, root: str | Path, size: int, sigma: float, margin: float = 0.1) -> None:
        self.src = Path(root)
        self.images = sorted(p for p in self.src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise FileNotFoundError(f"no images under {self.src}")
        self.size, self.sigma, self.margin = size, sigma, margin

    def __len__(self) -> int:
        return len(self.images)

    def name(self, i: int) -> str:
        return str(self.images[i])

    def probe(self, i: int) -> Probe:
        face, mapped = read_catflw(self.images[i], self.src, self.size, self.margin)
        heat = render_heatmaps(mapped, self.size, self.sigma)[0]
        return Probe(face, (heat * 255).round().astype(np.uint8))


class AlignedCheck:
    """An aligned ``<root>/<split>/{A,B}`` folder as a check source: every A and every B name once
    (a name on one side only is a missing file), the face B with its heatmap A overlaid."""

    def __init__(self, root: str | Path, split: str, size: int) -> None:
        self.pairs = AlignedPairs(root, split, size)  # raises naming a missing folder
        base = Path(root) / split
        a = {p.stem: p for p in sorted((base / "A").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES + (".npy",)}
        b = {p.stem: p for p in sorted((base / "B").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        self.names = sorted(set(a) | set(b))
        self.a, self.b, self.base = a, b, base
        self.index = {a_path.stem: k for k, (a_path, _) in enumerate(self.pairs.pairs)}

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        stem = self.names[i]
        return str(self.a.get(stem) or self.b[stem])

    def probe(self, i: int) -> Probe:
        stem = self.names[i]
        if stem not in self.a or stem not in self.b:
            side = "A" if stem not in self.a else "B"
            raise FileNotFoundError(f"{self.name(i)}: its {side} file not found in {self.base / side}")
        a, b = self.pairs._decoded(self.index[stem])
        return Probe(b, _heat_u8(a))


class SyntheticCheck:
    def __init__(self, faces: SyntheticFaces) -> None:
        self.faces = faces

    def __len__(self) -> int:
        return len(self.faces)

    def name(self, i: int) -> str:
        return f"synthetic[{self.faces.seed}:{i}]"

    def probe(self, i: int) -> Probe:
        heat, face, _ = self.faces._draw(i)
        return Probe(face, (heat.max(axis=0) * 255).round().astype(np.uint8))


def check_sources(cfg: GanDataConfig, channels: int) -> dict[str, object]:
    """``montage data check``: synthetic, aligned train/val folders, or a raw CatFLW folder as
    ``data.root`` (no ``train/A`` inside: checked as ``montage data catflw`` would read it)."""
    if cfg.source == "synthetic":
        return {
            "train": SyntheticCheck(SyntheticFaces(cfg.synthetic_train, cfg.size, cfg.sigma, cfg.seed, channels)),
            "val": SyntheticCheck(SyntheticFaces(cfg.synthetic_val, cfg.size, cfg.sigma, cfg.seed + 1, channels)),
        }
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root not found: {root}")
    if not (root / "train" / "A").is_dir():
        return {"catflw": CatflwCheck(root, cfg.size, cfg.sigma)}
    return {split: AlignedCheck(root, split, cfg.size) for split in ("train", "val") if (root / split).is_dir()}
