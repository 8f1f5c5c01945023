"""Harmonization pair sources and the foreground perturbations that make composites.

- :class:`IHarmony4`: ``<root>/<subset>/{composite_images,masks,real_images}`` with
  ``<subset>_train.txt`` / ``<subset>_test.txt`` lists, several subsets at once.
- :class:`PerturbedMasks`: any image + person-mask source the segmentation task reads (COCO,
  Supervisely, folder); the foreground of the real image is perturbed to make the composite.
- :class:`CutoutsOnBackgrounds`: RGBA cut-outs pasted on background photos at random scale and position.
- :class:`SyntheticPairs`: seeded synthetic persons in scenes lit as a whole.
Perturbations follow iHarmony4's recipe: colour transfer from another image, brightness /
contrast / gamma / hue / saturation / white balance, applied inside the mask only.
(:mod:`montage.tasks.harmonization.data` turns a source into the training dataset.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from montage.platform.imaging import ImageError, list_images, read_image, read_mask
from montage.platform.masks import SyntheticPersons

log = logging.getLogger(__name__)

IHARMONY4_SUBSETS = ("HCOCO", "HAdobe5k", "HFlickr", "Hday2night")
Triple = tuple[np.ndarray, np.ndarray, np.ndarray]  # composite RGB, mask 0..255, target RGB


@dataclass
class PerturbConfig:
    """Foreground appearance changes; each a ± range (0 disables it)."""

    colour_transfer: float = 0.5  # probability of Reinhard Lab transfer from another image
    brightness: float = 0.25
    contrast: float = 0.25
    gamma: float = 0.35  # log-range
    hue: float = 10.0  # degrees
    saturation: float = 0.3
    white_balance: float = 0.15
    min_change: float = 10.0  # re-draw until the foreground changed by at least this RMS (0–255)


# ----------------------------------------------------------------------- perturbation


def reinhard_transfer(img: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Match the Lab mean/std of ``img``'s masked region to all of ``ref``."""
    lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    ref_lab = cv2.cvtColor(ref.astype(np.float32) / 255, cv2.COLOR_RGB2Lab).reshape(-1, 3)
    fg = lab[mask > 127]
    if len(fg) < 4:
        return img
    mu, sd = fg.mean(0), fg.std(0) + 1e-3
    rmu, rsd = ref_lab.mean(0), ref_lab.std(0) + 1e-3
    out = (lab - mu) / sd * rsd + rmu
    out[..., 0] = out[..., 0].clip(0, 100)
    rgb = cv2.cvtColor(out.astype(np.float32), cv2.COLOR_Lab2RGB)
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


def photometric(img: np.ndarray, rng: np.random.Generator, p: PerturbConfig) -> np.ndarray:
    x = img.astype(np.float32) / 255
    if p.white_balance:
        x = x * (1 + rng.uniform(-p.white_balance, p.white_balance, 3))
    if p.brightness or p.contrast:
        mean = x.mean()
        x = (x - mean) * (1 + rng.uniform(-p.contrast, p.contrast)) + mean * (
            1 + rng.uniform(-p.brightness, p.brightness)
        )
    x = x.clip(0, 1)
    if p.gamma:
        x = x ** float(np.exp(rng.uniform(-p.gamma, p.gamma)))
    if p.hue or p.saturation:
        hsv = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-p.hue, p.hue)) % 360
        hsv[..., 1] = (hsv[..., 1] * (1 + rng.uniform(-p.saturation, p.saturation))).clip(0, 1)
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return (x.clip(0, 1) * 255).round().astype(np.uint8)


def make_composite(
    real: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    p: PerturbConfig,
    ref: np.ndarray | None = None,
    source: np.ndarray | None = None,
) -> np.ndarray:
    """Change the foreground's appearance only; the background stays bit-identical.

    The composite's foreground is ``source`` (default: ``real`` itself) re-lit by a random
    perturbation; the rest of the composite is ``real``.
    """
    alpha = (mask.astype(np.float32) / 255)[..., None]
    fg = mask > 127
    for _ in range(8):
        changed = real if source is None else source
        if ref is not None and rng.random() < p.colour_transfer:
            changed = reinhard_transfer(changed, mask, ref)
        changed = photometric(changed, rng, p)
        comp = (changed * alpha + real * (1 - alpha)).round().astype(np.uint8)
        comp[mask == 0] = real[mask == 0]
        if not fg.any() or np.sqrt(((comp[fg].astype(np.float32) - real[fg]) ** 2).mean()) >= p.min_change:
            return comp
    return comp


# ----------------------------------------------------------------------------- sources


class PairSource(Protocol):
    def __len__(self) -> int: ...

    def load(self, i: int, rng: np.random.Generator) -> Triple: ...

    def name(self, i: int) -> str: ...


class IHarmony4:
    """iHarmony4 lists: each line a composite file name ``<name>_<m>_<k>.jpg`` (optionally
    prefixed by ``composite_images/``); mask ``masks/<name>_<m>.png``, target ``real_images/<name>.jpg``."""

    def __init__(self, root: str, subsets: list[str], split: str) -> None:
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"iHarmony4 root not found: {base}")
        self.items: list[tuple[Path, Path, Path]] = []
        for subset in subsets:
            listing = base / subset / f"{subset}_{split}.txt"
            if not listing.is_file():
                raise FileNotFoundError(f"iHarmony4 list not found: {listing}")
            for line in listing.read_text().split():
                comp_name = Path(line).name
                parts = Path(comp_name).stem.rsplit("_", 2)
                if len(parts) != 3:
                    raise ValueError(f"{listing}: '{line}' is not <name>_<mask>_<k>.<ext>")
                name, m, _ = parts
                sub = base / subset
                self.items.append(
                    (
                        sub / "composite_images" / comp_name,
                        sub / "masks" / f"{name}_{m}.png",
                        sub / "real_images" / f"{name}.jpg",
                    )
                )
        if not self.items:
            raise ValueError(f"no {split} pairs listed under {base} for {subsets}")

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        return str(self.items[i][0])

    def load(self, i: int, rng: np.random.Generator) -> Triple:
        comp_p, mask_p, real_p = self.items[i]
        comp, mask, real = read_image(comp_p), read_mask(mask_p), read_image(real_p)
        if not (comp.shape == real.shape and mask.shape == comp.shape[:2]):
            raise ImageError(
                f"{comp_p}: composite {comp.shape[:2]}, mask {mask.shape}, real {real.shape[:2]} differ in size"
            )
        return comp, mask, real


class PerturbedMasks:
    """Real images with foreground masks (any segmentation source) → perturbed composites."""

    def __init__(self, masks, perturb: PerturbConfig) -> None:
        self.masks = masks
        self.perturb = perturb

    def __len__(self) -> int:
        return len(self.masks)

    def name(self, i: int) -> str:
        return self.masks.name(i)

    def load(self, i: int, rng: np.random.Generator) -> Triple:
        real, mask, _ = self.masks.load(i)
        ref = self.masks.load(int(rng.integers(len(self.masks))))[0] if len(self.masks) > 1 else None
        return make_composite(real, mask, rng, self.perturb, ref), mask, real


class CutoutsOnBackgrounds:
    """RGBA cut-outs pasted on backgrounds (random scale 0.3–0.8 of the short side, random
    position); the target keeps the cut-out's own colours, the composite is perturbed."""

    def __init__(self, cutouts: str, backgrounds: str, count: int, perturb: PerturbConfig) -> None:
        self.cutouts = list_images(cutouts)
        self.backgrounds = list_images(backgrounds)
        if not self.cutouts or not self.backgrounds:
            raise FileNotFoundError(f"need RGBA cut-outs in {cutouts} and photos in {backgrounds}")
        self.count = count
        self.perturb = perturb

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return str(self.cutouts[i % len(self.cutouts)])

    def load(self, i: int, rng: np.random.Generator) -> Triple:
        return self.paste(i % len(self.cutouts), int(rng.integers(len(self.backgrounds))), rng)

    def paste(self, cut: int, background: int, rng: np.random.Generator) -> Triple:
        """Cut-out ``cut`` on background ``background`` (``load`` draws the background)."""
        rgba = read_image(self.cutouts[cut], mode="unchanged")
        if rgba.ndim != 3 or rgba.shape[2] != 4:
            raise ImageError(f"{self.cutouts[cut]}: a cut-out must be an RGBA image")
        bg = read_image(self.backgrounds[background])
        h, w = bg.shape[:2]
        scale = rng.uniform(0.3, 0.8) * min(h, w) / max(rgba.shape[:2])
        ch, cw = max(1, int(rgba.shape[0] * scale)), max(1, int(rgba.shape[1] * scale))
        small = cv2.resize(rgba, (cw, ch), interpolation=cv2.INTER_AREA)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        mask = np.zeros((h, w), np.uint8)
        mask[y : y + ch, x : x + cw] = small[..., 3]
        real = bg.copy()
        a = small[..., 3:4].astype(np.float32) / 255
        real[y : y + ch, x : x + cw] = (
            (small[..., :3] * a + bg[y : y + ch, x : x + cw] * (1 - a)).round().astype(np.uint8)
        )
        return make_composite(real, mask, rng, self.perturb, bg), mask, real


def neutral(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The unlit scene: foreground and background each get, per channel, the mean and
    standard deviation of the whole image's grey level (grey world, one exposure). Their
    textures are unchanged (an affine map per channel and region)."""
    x = image.astype(np.float32)
    mu, sd = float(x.mean()), float(x.std()) + 1e-3
    fg = mask > 127
    for region in (fg, ~fg):
        if region.sum() < 4:
            continue
        px = x[region]
        x[region] = (px - px.mean(0)) / (px.std(0) + 1e-3) * sd + mu
    return x.clip(0, 255).round().astype(np.uint8)


class SyntheticPairs(PerturbedMasks):
    """A synthetic person in a scene; one illuminant lights the real image, another the
    composite's foreground.

    Person and background share one grey-world exposure before lighting (each region's
    channels have the mean and spread of the scene's grey level), the real image is the whole scene under one random
    photometric change (white balance, brightness, contrast, gamma, hue, saturation: the
    scene's illuminant and tone curve), and the composite's foreground is the same person
    under an independent draw of it (or colour-transferred to another lit scene). So, as in
    iHarmony4, the background says how the scene is lit and the foreground's own statistics
    say how the pasted object was lit: the pair is well posed, unlike a foreground re-coloured
    with nothing in the image to tell the true colours.
    """

    def __init__(self, count: int, size: int, seed: int, perturb: PerturbConfig) -> None:
        super().__init__(SyntheticPersons(count, size, seed), perturb)

    def _scene(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        base, mask, _ = self.masks.load(i)
        base = neutral(base, mask)
        return base, mask, photometric(base, rng, self.perturb)

    def load(self, i: int, rng: np.random.Generator) -> Triple:
        base, mask, real = self._scene(i, rng)
        ref = self._scene(int(rng.integers(len(self))), rng)[2] if len(self) > 1 else None
        return make_composite(real, mask, rng, self.perturb, ref, source=base), mask, real
