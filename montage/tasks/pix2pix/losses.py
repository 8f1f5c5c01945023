"""pix2pix objective: adversarial (BCE with logits, label smoothing) + λ_L1·L1 + λ_perc·perceptual."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class GanLossConfig:
    """``gan``, ``l1`` (λ_L1) and ``perceptual`` (λ_perc) weight the generator's terms; D's
    targets are drawn uniformly from ``real_label`` / ``fake_label`` (label smoothing)."""

    gan: float = 1.0
    l1: float = 100.0
    perceptual: float = 10.0
    real_label: tuple[float, float] = (0.9, 1.0)
    fake_label: tuple[float, float] = (0.0, 0.1)
    vgg_weights: str = "imagenet"
    vgg_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3"])

    def __post_init__(self) -> None:
        for key in ("gan", "l1", "perceptual"):
            if getattr(self, key) < 0:
                raise ValueError(f"loss weight {key} must be >= 0")
        for key in ("real_label", "fake_label"):
            lo, hi = getattr(self, key)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{key} must be a range within [0, 1], got {[lo, hi]}")

    def weights(self) -> dict[str, float]:
        return {"gan": self.gan, "l1": self.l1, "perceptual": self.perceptual}


def smoothed_targets(logits: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-logit targets drawn uniformly from [lo, hi]."""
    return (
        torch.empty_like(logits, dtype=torch.float32).uniform_(lo, hi)
        if hi > lo
        else torch.full_like(logits, lo, dtype=torch.float32)
    )


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, cfg: GanLossConfig) -> torch.Tensor:
    """½ (BCE(D(real), U[real_label]) + BCE(D(fake), U[fake_label]))."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    real = F.binary_cross_entropy_with_logits(real_logits, smoothed_targets(real_logits, *cfg.real_label))
    fake = F.binary_cross_entropy_with_logits(fake_logits, smoothed_targets(fake_logits, *cfg.fake_label))
    return 0.5 * (real + fake)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator wants D to call its output real (target 1, no smoothing)."""
    fake_logits = fake_logits.float()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
