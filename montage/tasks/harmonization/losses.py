"""Harmonization loss: α·MSE + β·perceptual + γ·colour consistency (Lab) + δ·style (Gram)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from montage.nn.colour import rgb_to_lab
from montage.nn.losses import VGGFeatures, perceptual_loss, style_loss


@dataclass
class HarmLossConfig:
    """Term weights (α mse, β perceptual, γ colour, δ style) and the Lab channel weights.

    ``lab_weights`` = (L, a, b): chroma weighted above lightness, since a pasted object's
    wrong tint is what the eye catches first.
    """

    mse: float = 1.0
    perceptual: float = 0.1
    colour: float = 0.5
    style: float = 0.05
    lab_weights: tuple[float, float, float] = (0.5, 1.0, 1.0)
    vgg_weights: str = "imagenet"
    vgg_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3"])

    def __post_init__(self) -> None:
        for key in ("mse", "perceptual", "colour", "style"):
            if getattr(self, key) < 0:
                raise ValueError(f"loss weight {key} must be >= 0")

    def weights(self) -> dict[str, float]:
        return {"mse": self.mse, "perceptual": self.perceptual, "colour": self.colour, "style": self.style}


def lab_colour_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: tuple[float, float, float]
) -> torch.Tensor:
    """Σ_c w_c · mean over the mask of |Lab(pred) − Lab(target)|_c / 100, per image, averaged over
    the batch (per-image: a global batch's gradient does not depend on how DDP splits it)."""
    diff = (rgb_to_lab(pred) - rgb_to_lab(target)).abs() / 100
    w = torch.tensor(weights, device=pred.device, dtype=diff.dtype).view(1, 3, 1, 1)
    area = mask.float().sum((1, 2, 3)).clamp(min=1.0)
    return ((diff * w * mask).sum((1, 2, 3)) / area).mean()


def foreground_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, min_area: float = 0.05
) -> torch.Tensor:
    """Squared error summed over the image, divided by the foreground area (at least
    ``min_area`` of the image): foreground-normalised MSE. The model only changes the
    masked region, so averaging over every pixel would let a small foreground's error
    vanish into the untouched background."""
    sq = ((pred - target) ** 2).mean(1, keepdim=True)
    per_image_area = mask.float().sum((1, 2, 3)).clamp(min=min_area * mask.shape[-1] * mask.shape[-2])
    return (sq.sum((1, 2, 3)) / per_image_area).mean()


class HarmonizationLoss(nn.Module):
    def __init__(self, cfg: HarmLossConfig, vgg: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        needs_vgg = cfg.perceptual > 0 or cfg.style > 0
        self.vgg = vgg if vgg is not None else (VGGFeatures(cfg.vgg_layers, cfg.vgg_weights) if needs_vgg else None)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        pred, target = pred.float(), target.float()
        terms = {
            "mse": foreground_mse(pred, target, mask),
            "colour": lab_colour_loss(pred, target, mask, self.cfg.lab_weights),
        }
        if self.vgg is not None:
            fp = self.vgg(pred)
            with torch.no_grad():
                ft = self.vgg(target)
            terms["perceptual"] = perceptual_loss(fp, ft)
            terms["style"] = style_loss(fp, ft)
        return terms
