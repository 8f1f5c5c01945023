"""Comparing two model arms without labels: agreement of two outputs for the same input (shadow
mode) and significance tests between two samples of a per-request value (latency, a quality
feature). No Ray here: the ingress's :mod:`montage.serve.rollout` calls these."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

THUMB = 256  # agreement is measured on thumbnails: cheap in the ingress, and enough for a mean


def _fit(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = THUMB / max(h, w)
    if s >= 1:
        return a
    return cv2.resize(a, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def trimap_band(alpha: np.ndarray, width: int = 0) -> np.ndarray:
    """The unknown band of a trimap made from ``alpha`` (> 0.5 is foreground): the pixels within
    ``width`` px (default 3 % of the short side, at least 2) of the foreground's boundary."""
    fg = (alpha > 0.5).astype(np.uint8)
    width = width or max(2, round(0.03 * min(alpha.shape[:2])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    return cv2.dilate(fg, kernel) > cv2.erode(fg, kernel)


def alpha_agreement(champion: np.ndarray, challenger: np.ndarray) -> dict[str, float]:
    """Two alphas of one image (uint8 0–255 or float 0–1): IoU of the foregrounds (> 0.5; 1 when
    both are empty), and SAD (mean absolute difference, in [0, 1]) inside the champion's trimap
    band, where matting models disagree first (0 when the band is empty)."""
    a, b = _unit(_fit(np.asarray(champion))), _unit(_fit(np.asarray(challenger)))
    if a.shape != b.shape:
        raise ValueError(f"alphas of different sizes: {a.shape} and {b.shape}")
    fa, fb = a > 0.5, b > 0.5
    union = int((fa | fb).sum())
    iou = float((fa & fb).sum() / union) if union else 1.0
    band = trimap_band(a) | trimap_band(b)
    sad = float(np.abs(a - b)[band].mean()) if band.any() else 0.0
    return {"alpha_iou": iou, "band_sad": sad}


def delta_e(champion: np.ndarray, challenger: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean CIE76 ΔE (CIE Lab, D65) between two harmonized RGB images inside the mask (> 50 %);
    0 when the mask is empty. ΔE ≈ 2.3 is a just-noticeable difference."""
    a, b, m = _fit(np.asarray(champion)), _fit(np.asarray(challenger)), _fit(np.asarray(mask))
    if a.shape != b.shape:
        raise ValueError(f"images of different sizes: {a.shape} and {b.shape}")
    inside = _unit(m if m.ndim == 2 else m[..., 0]) > 0.5
    if not inside.any():
        return {"delta_e": 0.0}
    lab_a = cv2.cvtColor(_unit(a), cv2.COLOR_RGB2Lab)
    lab_b = cv2.cvtColor(_unit(b), cv2.COLOR_RGB2Lab)
    return {"delta_e": float(np.linalg.norm(lab_a - lab_b, axis=-1)[inside].mean())}


def _clean(values: Any) -> np.ndarray:
    x = np.asarray(list(values), np.float64)
    return x[np.isfinite(x)]


def compare_samples(
    champion: Any, challenger: Any, alpha: float = 0.05, resamples: int = 400, seed: int = 0
) -> dict[str, Any]:
    """Two independent samples of one per-request value (latency, a quality feature), one per arm.

    Mann-Whitney U (two-sided, scipy) says whether their distributions differ at ``alpha``;
    ``effect`` is the rank-biserial correlation (−1…1: the share of pairs in which the challenger
    is larger minus the share in which it is smaller); ``median_diff_ci`` is a percentile bootstrap
    interval of challenger − champion medians. Below 5 values per arm nothing is tested."""
    a, b = _clean(champion), _clean(challenger)
    out: dict[str, Any] = {
        "n": [int(a.size), int(b.size)],
        "median": [_r(np.median(a)) if a.size else None, _r(np.median(b)) if b.size else None],
        "p95": [_r(np.percentile(a, 95)) if a.size else None, _r(np.percentile(b, 95)) if b.size else None],
    }
    if a.size < 5 or b.size < 5:
        return {**out, "p_value": None, "significant": False, "effect": 0.0, "median_diff_ci": None}
    from scipy.stats import mannwhitneyu

    if np.ptp(np.concatenate([a, b])) == 0:  # all values equal: nothing differs
        p, u = 1.0, a.size * b.size / 2
    else:
        res = mannwhitneyu(b, a, alternative="two-sided")
        p, u = float(res.pvalue), float(res.statistic)
    rng = np.random.default_rng(seed)
    diffs = np.median(rng.choice(b, (resamples, b.size)), axis=1) - np.median(
        rng.choice(a, (resamples, a.size)), axis=1
    )
    lo, hi = np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {
        **out,
        "p_value": float(f"{p:.3g}"),
        "significant": bool(p < alpha),
        "effect": _r(2 * u / (a.size * b.size) - 1),
        "median_diff_ci": [_r(lo), _r(hi)],
    }


def p95_ratio_ci(
    champion: Any, challenger: Any, alpha: float = 0.05, resamples: int = 400, seed: int = 0
) -> list[float] | None:
    """Bootstrap interval of challenger p95 / champion p95 (None below 20 values per arm)."""
    a, b = _clean(champion), _clean(challenger)
    if a.size < 20 or b.size < 20:
        return None
    rng = np.random.default_rng(seed)
    pa = np.percentile(rng.choice(a, (resamples, a.size)), 95, axis=1)
    pb = np.percentile(rng.choice(b, (resamples, b.size)), 95, axis=1)
    ratio = pb / np.maximum(pa, 1e-9)
    lo, hi = np.percentile(ratio, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [_r(lo), _r(hi)]


def error_rates(champion: tuple[int, int], challenger: tuple[int, int], alpha: float = 0.05) -> dict[str, Any]:
    """(errors, requests) per arm: the rates and Fisher's exact test of their difference."""
    (ea, na), (eb, nb) = champion, challenger
    out: dict[str, Any] = {"rate": [_r(ea / na) if na else 0.0, _r(eb / nb) if nb else 0.0]}
    if not na or not nb:
        return {**out, "p_value": None, "significant": False}
    from scipy.stats import fisher_exact

    p = float(fisher_exact([[ea, na - ea], [eb, nb - eb]]).pvalue)
    return {**out, "p_value": float(f"{p:.3g}"), "significant": bool(p < alpha)}


def mean_ci(values: Any) -> dict[str, Any]:
    """Mean of a sample (shadow agreement) with a normal-approximation interval."""
    x = _clean(values)
    if not x.size:
        return {"n": 0, "mean": None, "ci": None}
    half = 1.96 * float(np.std(x, ddof=1)) / math.sqrt(x.size) if x.size > 1 else float("inf")
    m = float(np.mean(x))
    return {"n": int(x.size), "mean": _r(m), "ci": [_r(m - half), _r(m + half)] if math.isfinite(half) else None}


def _r(v: Any) -> float:
    return round(float(v), 5)
