"""Per-sample metrics shared by tasks. Every function returns a tensor of shape (B,)
so the loop can average over samples and across ranks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


def _ratio(num: torch.Tensor, den: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """num / den, with ``empty`` where den == 0 (e.g. IoU of two empty masks is 1)."""
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.full_like(num, empty))


def binary_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """IoU, Dice, pixel accuracy, precision, recall (sensitivity), specificity, F1 of binary
    masks (any shape with a leading batch dim; truthy = foreground)."""
    p = pred.bool().flatten(1).float()
    t = target.bool().flatten(1).float()
    tp = (p * t).sum(1)
    fp = (p * (1 - t)).sum(1)
    fn = ((1 - p) * t).sum(1)
    tn = ((1 - p) * (1 - t)).sum(1)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": (tp + tn) / p.shape[1],
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * precision * recall, precision + recall, empty=0.0),
    }


def _gaussian_derivative_kernels(sigma: float = 1.4) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order Gaussian derivative filters (x and y), as used by the matting gradient error."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    dg = -x / sigma**2 * g
    kx = g[:, None] * dg[None, :]  # derivative along x, smoothing along y
    kx = kx / kx.abs().sum() * 2  # normalise so a unit ramp has slope ~1
    return kx.float(), kx.t().contiguous().float()


def alpha_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Matting errors of alpha maps in [0, 1], shape (B, 1, H, W).

    ``sad`` Σ|Δα| / 1000, ``mse`` mean Δα², ``grad`` Σ(|∇α̂| − |∇α|)² / 1000 with
    Gaussian-derivative gradients (σ = 1.4), the units matting benchmarks report.
    """
    pred = pred.float()
    target = target.float()
    kx, ky = _gaussian_derivative_kernels()
    k = torch.stack([kx, ky]).unsqueeze(1).to(pred)
    pad = k.shape[-1] // 2

    def mag(a: torch.Tensor) -> torch.Tensor:
        g = F.conv2d(F.pad(a, (pad,) * 4, mode="replicate"), k)
        return g.pow(2).sum(1, keepdim=True).sqrt()

    return {
        "sad": _per_sample_sum((pred - target).abs()) / 1000,
        "mse": (pred - target).pow(2).flatten(1).mean(1),
        "grad": _per_sample_sum((mag(pred) - mag(target)).pow(2)) / 1000,
    }


def boundary_band(mask: torch.Tensor, k: int) -> torch.Tensor:
    """The unknown region of a trimap made from a binary mask (B, 1, H, W): pixels within
    ``k`` px of the boundary (the mask dilated by k minus the mask eroded by k)."""
    m = mask.float()
    size = 2 * k + 1
    dilated = F.max_pool2d(m, size, stride=1, padding=k)
    eroded = -F.max_pool2d(-m, size, stride=1, padding=k)
    return dilated - eroded


def trimap_metrics(pred: torch.Tensor, target: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Edge quality of an alpha map in [0, 1] against the true mask, inside the boundary
    band of width ``k`` (see :func:`boundary_band`): pixel accuracy of the alpha thresholded
    at 0.5, SAD Σ|Δα| / 1000 and MSE of α, per sample (an empty band scores 1 / 0 / 0)."""
    band = boundary_band((target > 0.5).float(), k)
    n = _per_sample_sum(band)
    correct = ((pred > 0.5) == (target > 0.5)).float() * band
    diff = (pred.float() - target.float()) * band
    return {
        "acc": _ratio(_per_sample_sum(correct), n),
        "sad": _per_sample_sum(diff.abs()) / 1000,
        "mse": _ratio(_per_sample_sum(diff.pow(2)), n, empty=0.0),
    }


def mse_255(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE on the 0–255 scale of images given in [0, 1], per sample."""
    return ((pred.float() - target.float()) * 255).pow(2).flatten(1).mean(1)


def fmse_255(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Foreground MSE on the 0–255 scale: Σ mask·(pred−gt)² / (C·Σ mask), per sample."""
    c = pred.shape[1]
    err = ((pred.float() - target.float()) * 255).pow(2) * mask.float()
    return _per_sample_sum(err) / (c * _per_sample_sum(mask.float())).clamp(min=1e-6)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per sample (capped at 100 dB for identical images)."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse.clamp(min=1e-10))).clamp(max=100.0)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per sample via piq (inputs are clamped to [0, data_range] first, as piq requires)."""
    import piq

    p = pred.float().clamp(0, data_range)
    t = target.float().clamp(0, data_range)
    kernel = 11 if min(p.shape[-2:]) >= 11 else (min(p.shape[-2:]) // 2) * 2 - 1
    return piq.ssim(p, t, data_range=data_range, reduction="none", kernel_size=max(kernel, 3))
