"""Harmonization UNet: composite RGB + mask → a per-pixel colour transform applied in the mask.

The network predicts, per pixel and channel, a gain ``g`` and a bias ``b``; the output is
``composite + mask · (g·composite + b)``. Because it predicts a transform rather than
pixels, the transform can be computed at the training size, upsampled, and applied to a
full-resolution composite (see ``apply_transform``), and the background is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from montage.nn.unet import ConvEncoder, UNetDecoder


@dataclass
class HarmModelConfig:
    """Plain UNet widths per level (fine → coarse); ``tiny`` sizes in tests: [8, 16, 32]."""

    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    norm: str = "batch"
    bottleneck_dropout: float = 0.0
    max_gain: float = 1.0  # |g| ≤ max_gain (tanh-bounded)
    region_context: bool = True  # mix foreground and background feature means into the bottleneck
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if len(self.widths) < 2:
            raise ValueError("widths needs at least 2 levels")
        if self.norm not in ("batch", "instance", "group", "none"):
            raise ValueError(f"norm: unknown '{self.norm}'; valid: batch, instance, group, none")


def apply_transform(composite: torch.Tensor, mask: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """composite (B,3,H,W) in [0,1], mask (B,1,H,W), transform (B,6,h,w) at any h, w."""
    if transform.shape[-2:] != composite.shape[-2:]:
        transform = F.interpolate(transform, size=composite.shape[-2:], mode="bilinear", align_corners=False)
    gain, bias = transform[:, :3], transform[:, 3:]
    return (composite + mask * (gain * composite + bias)).clamp(0, 1)


class RegionContext(nn.Module):
    """Image-wide context for a per-pixel decoder: the mean bottleneck feature over the
    foreground and over the background, broadcast to every position and mixed in by a 1×1
    conv (residual). Harmonizing is comparing the two regions' statistics, which a UNet's
    receptive field at the bottleneck does not cover on its own."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.mix = nn.Conv2d(3 * ch, ch, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = F.adaptive_avg_pool2d(mask, x.shape[-2:])
        fg = (x * m).sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True).clamp(min=1e-3)
        bg = (x * (1 - m)).sum((2, 3), keepdim=True) / (1 - m).sum((2, 3), keepdim=True).clamp(min=1e-3)
        ctx = torch.cat([x, fg.expand_as(x), bg.expand_as(x)], dim=1)
        return x + F.relu(self.mix(ctx))


class HarmonizationUNet(nn.Module):
    def __init__(self, cfg: HarmModelConfig) -> None:
        super().__init__()
        self.encoder = ConvEncoder(4, cfg.widths, norm=cfg.norm, bottleneck_dropout=cfg.bottleneck_dropout)
        self.context = RegionContext(cfg.widths[-1]) if cfg.region_context else None
        self.decoder = UNetDecoder(
            cfg.widths, self.encoder.strides, cfg.widths[:-1][::-1], norm=cfg.norm, checkpointing=cfg.grad_checkpointing
        )
        self.head = nn.Conv2d(self.decoder.out_channels, 6, 1)
        nn.init.zeros_(self.head.weight)  # start as the identity transform: output = composite
        nn.init.zeros_(self.head.bias)
        self.max_gain = cfg.max_gain

    def transform(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 6, H, W): gain (tanh-bounded) and bias per channel."""
        x = torch.cat([composite * 2 - 1, mask], dim=1)
        feats = self.encoder(x)
        if self.context is not None:
            feats[-1] = self.context(feats[-1], mask)
        t = self.head(self.decoder(feats))
        return torch.cat([self.max_gain * torch.tanh(t[:, :3]), torch.tanh(t[:, 3:])], dim=1)

    def forward(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return apply_transform(composite, mask, self.transform(composite, mask))
