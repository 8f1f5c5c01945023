"""Image statistics for drift detection and no-reference output quality (numpy + OpenCV only).

The same functions describe the training inputs when a checkpoint is registered (the drift
reference) and the live requests in Serve, so the two are comparable by construction. Input
statistics are computed on a thumbnail (longest side :data:`THUMB`), which keeps them cheap
(well under a millisecond for a 512×512 image) and independent of the input's resolution;
width, height and aspect are the original's.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import cv2
import numpy as np

THUMB = 128  # longest side of the thumbnail the input statistics are computed on
INPUT_FEATURES = (
    "brightness",
    "contrast",
    "saturation",
    "sharpness",
    "colour_temperature",
    "width",
    "height",
    "aspect",
)
SEGMENTATION_OUTPUTS = ("foreground_fraction", "uncertain_alpha", "alpha_edge_sharpness")
HARMONIZATION_OUTPUTS = ("colour_change",)
REFERENCE_FORMAT = 1


def _thumb(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = THUMB / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def input_features(img: np.ndarray) -> dict[str, float]:
    """uint8 (H, W, 3) RGB (or (H, W) grey) → the input statistics of :data:`INPUT_FEATURES`.

    brightness / contrast: mean / std of the grey level in [0, 1]; saturation: mean HSV
    saturation in [0, 1]; sharpness: variance of the Laplacian of the grey thumbnail;
    colour_temperature: log of mean R over mean B (> 0 warm, < 0 cold)."""
    h, w = img.shape[:2]
    t = _thumb(img)
    if t.ndim == 2:
        t = np.repeat(t[..., None], 3, axis=2)
    t = np.ascontiguousarray(t[..., :3])
    gray = cv2.cvtColor(t, cv2.COLOR_RGB2GRAY)
    sat = cv2.cvtColor(t, cv2.COLOR_RGB2HSV)[..., 1]
    mean_rgb = t.reshape(-1, 3).mean(0)
    return {
        "brightness": float(gray.mean()) / 255.0,
        "contrast": float(gray.std()) / 255.0,
        "saturation": float(sat.mean()) / 255.0,
        "sharpness": float(cv2.Laplacian(gray, cv2.CV_32F).var()),
        "colour_temperature": math.log((float(mean_rgb[0]) + 1.0) / (float(mean_rgb[2]) + 1.0)),
        "width": float(w),
        "height": float(h),
        "aspect": float(w) / float(h),
    }


def alpha_features(alpha: np.ndarray, low: float = 0.1, high: float = 0.9) -> dict[str, float]:
    """A predicted alpha in [0, 1] → foreground fraction (alpha ≥ 0.5), share of uncertain alpha
    (``low`` < alpha < ``high``) and edge sharpness (mean gradient magnitude of the alpha thumbnail
    where it changes: crisp edges are high, a blurred or hesitant mask is low)."""
    a = np.asarray(alpha, np.float32)
    a = a[..., 0] if a.ndim == 3 else a
    t = _thumb(a)
    gx = cv2.Sobel(t, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(t, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx * gx + gy * gy)
    edge = mag > 0.05
    return {
        "foreground_fraction": float((a >= 0.5).mean()),
        "uncertain_alpha": float(((a > low) & (a < high)).mean()),
        "alpha_edge_sharpness": float(mag[edge].mean()) if edge.any() else 0.0,
    }


def colour_change(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean absolute colour change (in [0, 1]) inside the mask (> 50 %) between a composite and its
    harmonized result, on thumbnails; 0 when the mask is empty."""
    m = np.asarray(mask)
    m = m if m.dtype == np.uint8 else (np.clip(m, 0, 1) * 255).astype(np.uint8)
    m = (_thumb(m) > 127).astype(np.uint8)
    if not m.any():
        return {"colour_change": 0.0}
    diff = cv2.absdiff(np.ascontiguousarray(_thumb(before)), np.ascontiguousarray(_thumb(after)))
    return {"colour_change": float(np.mean(cv2.mean(diff, mask=m)[:3])) / 255.0}


# -- comparing a window of live values with the reference ---------------------------------------


def _bin_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    qs = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(qs)


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bins (-inf, e0), [e0], (e0, e1), [e1], …, (e_k, inf): discrete features (all images the
    same width) get a bin of their own per value instead of collapsing into one."""
    left = np.searchsorted(edges, values, side="left")
    exact = np.zeros(len(values), bool)
    inside = left < len(edges)
    exact[inside] = edges[left[inside]] == values[inside]
    return np.bincount(2 * left + exact, minlength=2 * len(edges) + 1).astype(np.float64)


def psi(reference: Iterable[float], live: Iterable[float], bins: int = 0, eps: float = 1e-4) -> float:
    """Population stability index of ``live`` against ``reference`` over the reference's quantile
    bins: Σ (p_live − p_ref) · ln(p_live / p_ref). Rule of thumb: < 0.1 stable, > 0.25 shifted.
    ``bins`` 0: one per 10 live samples, 4 to 10 (PSI of a small window is inflated by its
    sampling noise, about (bins − 1) / n)."""
    ref, cur = np.asarray(list(reference), np.float64), np.asarray(list(live), np.float64)
    if len(ref) == 0 or len(cur) == 0:
        return 0.0
    bins = bins or int(np.clip(len(cur) // 10, 4, 10))
    edges = _bin_edges(ref, bins)
    p = _bin_counts(ref, edges) / len(ref) + eps
    q = _bin_counts(cur, edges) / len(cur) + eps
    return float(np.sum((q - p) * np.log(q / p)))


def reference_entry(values: list[float], keep: int = 512) -> dict[str, Any]:
    """One feature of a drift reference: summary, quantiles and up to ``keep`` sample values
    (evenly thinned), enough for PSI and a two-sample KS test."""
    v = np.sort(np.asarray(values, np.float64))
    if len(v) > keep:
        v = v[np.linspace(0, len(v) - 1, keep).round().astype(int)]
    qs = [0.005, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.995]
    return {
        "n": int(len(values)),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "quantiles": {str(q): float(np.quantile(v, q)) for q in qs},
        "values": [round(float(x), 6) for x in v],
    }


def build_reference(rows: list[dict[str, float]], task: str, source: str = "") -> dict[str, Any]:
    """Per-sample feature dicts → the drift reference document (``drift_reference.json``)."""
    if not rows:
        raise ValueError("no samples to build a drift reference from")
    names = [k for k in rows[0] if all(k in r for r in rows)]
    return {
        "format": REFERENCE_FORMAT,
        "task": task,
        "source": source,
        "samples": len(rows),
        "thumb": THUMB,
        "features": {k: reference_entry([r[k] for r in rows]) for k in names},
    }
