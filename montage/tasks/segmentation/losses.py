"""Segmentation loss: α·BCE + β·Dice + γ·perceptual(VGG16 on composites) + δ·edge(Sobel)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from montage.nn.losses import VGGFeatures, edge_loss, perceptual_loss, soft_dice_loss


@dataclass
class SegLossConfig:
    """Weights of the named terms (0 disables a term) and the VGG feature source.

    ``vgg_weights``: imagenet | random | /path/to/vgg16.pth (random: offline tests/demo).
    """

    bce: float = 1.0
    dice: float = 1.0
    perceptual: float = 0.5
    edge: float = 0.3
    vgg_weights: str = "imagenet"
    vgg_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3"])

    def __post_init__(self) -> None:
        for key in ("bce", "dice", "perceptual", "edge"):
            if getattr(self, key) < 0:
                raise ValueError(f"loss weight {key} must be >= 0, got {getattr(self, key)}")

    def weights(self) -> dict[str, float]:
        return {"bce": self.bce, "dice": self.dice, "perceptual": self.perceptual, "edge": self.edge}


class SegmentationLoss(nn.Module):
    """Named terms of the segmentation objective; ``valid`` masks out ignored pixels.

    perceptual: L1 between VGG16 features of the image composited with the predicted
    alpha and with the true alpha (over black), i.e. the RGBA cut-outs as seen.
    """

    def __init__(self, cfg: SegLossConfig, vgg: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vgg = (
            vgg if vgg is not None else (VGGFeatures(cfg.vgg_layers, cfg.vgg_weights) if cfg.perceptual > 0 else None)
        )

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, image: torch.Tensor, valid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = logits.float()
        valid = torch.ones_like(target) if valid is None else valid
        prob = torch.sigmoid(logits)
        terms = {
            # per-image means, then their mean: a global batch's gradient does not depend on how DDP splits it
            "bce": (
                (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum((1, 2, 3))
                / valid.sum((1, 2, 3)).clamp(min=1)
            ).mean(),
            "dice": soft_dice_loss(prob * valid, target * valid),
            "edge": edge_loss(prob, target),
        }
        if self.vgg is not None and self.cfg.perceptual > 0:
            image = image.float()
            terms["perceptual"] = perceptual_loss(self.vgg(image * prob), self.vgg(image * target))
        return terms
