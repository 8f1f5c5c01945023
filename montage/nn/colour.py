"""Differentiable sRGB → CIE Lab (D65), following the sRGB and CIE 1976 definitions."""

from __future__ import annotations

import torch

# linear sRGB → XYZ (D65), IEC 61966-2-1
_RGB2XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])
_EPS = 216 / 24389  # (6/29)^3
_KAPPA = 24389 / 27


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055).clamp(min=1e-12) ** 2.4)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] → (B, 3, H, W) Lab with L in [0, 100], a/b about ±128."""
    lin = srgb_to_linear(rgb.float())
    xyz = torch.einsum("ij,bjhw->bihw", _RGB2XYZ.to(lin), lin)
    t = xyz / _WHITE_D65.to(lin).view(1, 3, 1, 1)
    f = torch.where(t > _EPS, t.clamp(min=1e-12) ** (1 / 3), (_KAPPA * t + 16) / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], dim=1)
