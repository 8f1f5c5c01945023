"""Harmonization UNet: composite RGB + mask → a per-pixel colour transform applied in the mask.

``model.head``:

- ``pixel``: the network predicts, per pixel and channel, a gain ``g`` and a bias ``b``; the
  output is ``composite + mask · (g·composite + b)`` (a 6-channel transform).
- ``global``: a per-image 3×4 colour matrix predicted from the two regions' colour statistics
  (means, covariances) and their pooled bottleneck features, starting from the RGB
  statistics transfer (the foreground's per-channel mean and spread moved to the
  background's), plus the UNet's per-pixel gain and bias as a learned residual; the output
  is ``composite + mask · ((M − I)·composite + b)`` with a per-pixel 3×3 ``M`` (a 12-channel
  transform). Harmonizing a re-lit object is mostly one colour change of the whole region,
  which a per-pixel head has to rebuild at every pixel from local features.

Because either predicts a transform rather than pixels, the transform can be computed at
the training size, upsampled, and applied to a full-resolution composite (see
``apply_transform``), and the background is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    head: Literal["pixel", "global"] = "pixel"  # global: a per-image colour matrix + the per-pixel residual
    global_hidden: int = 64  # head=global: hidden width of the MLP on the region statistics

    def __post_init__(self) -> None:
        if self.head not in ("pixel", "global"):
            raise ValueError(f"head: unknown '{self.head}'; valid: pixel, global")
        if self.global_hidden < 1:
            raise ValueError(f"global_hidden must be >= 1, got {self.global_hidden}")
        if len(self.widths) < 2:
            raise ValueError("widths needs at least 2 levels")
        if self.norm not in ("batch", "instance", "group", "none"):
            raise ValueError(f"norm: unknown '{self.norm}'; valid: batch, instance, group, none")


def apply_transform(composite: torch.Tensor, mask: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """composite (B,3,H,W) in [0,1], mask (B,1,H,W), transform at any h, w: (B,6,h,w) per-channel
    gain and bias, or (B,12,h,w) a 3×3 matrix ``M − I`` (row-major) and a bias."""
    if transform.shape[-2:] != composite.shape[-2:]:
        transform = F.interpolate(transform, size=composite.shape[-2:], mode="bilinear", align_corners=False)
    if transform.shape[1] == 6:
        change = transform[:, :3] * composite + transform[:, 3:]
    elif transform.shape[1] == 12:
        b, _, h, w = transform.shape
        m = transform[:, :9].reshape(b, 3, 3, h, w)
        change = (m * composite.unsqueeze(1)).sum(2) + transform[:, 9:]
    else:
        raise ValueError(f"a transform has 6 or 12 channels, got {transform.shape[1]}")
    return (composite + mask * change).clamp(0, 1)


def region_statistics(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean (B, C) and covariance (B, C, C) of ``x`` (B, C, H, W) under ``weights`` (B, 1, H, W)."""
    total = weights.sum((2, 3)).clamp(min=1e-3)  # (B, 1)
    mu = (x * weights).sum((2, 3)) / total
    d = (x - mu[..., None, None]) * weights.sqrt()
    cov = torch.einsum("bihw,bjhw->bij", d, d) / total[..., None]
    return mu, cov


class GlobalColour(nn.Module):
    """A per-image 3×4 colour matrix for the foreground from the regions' statistics.

    It starts (zero-initialised last layer) as the RGB statistics transfer,
    ``y = μ_bg + diag(σ_bg/σ_fg)·(x − μ_fg)``; an MLP on the foreground's and the background's
    means, standard deviations, correlations and pooled features adds a full 3×3 correction
    to the matrix and a shift, so it can learn what the transfer gets wrong (cross-channel
    changes such as hue and saturation, the tone curve's effect on the statistics)."""

    def __init__(self, feat_ch: int, hidden: int) -> None:
        super().__init__()
        n_stats = 2 * (3 + 3 + 3)  # per region: mean, std, 3 correlations
        self.mlp = nn.Sequential(nn.Linear(n_stats + 2 * feat_ch, hidden), nn.ReLU(), nn.Linear(hidden, 12))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @staticmethod
    def _describe(mu: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = cov.diagonal(dim1=1, dim2=2).clamp(min=1e-6).sqrt()
        corr = cov / (sd[:, :, None] * sd[:, None, :])
        iu = torch.triu_indices(3, 3, 1, device=mu.device)
        return sd, torch.cat([mu * 2 - 1, sd * 4, corr[:, iu[0], iu[1]]], dim=1)

    def forward(self, composite: torch.Tensor, mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """(B, 12): ``M − I`` row-major and the bias of ``y = M·x + b``."""
        mu_f, cov_f = region_statistics(composite, mask)
        mu_b, cov_b = region_statistics(composite, 1 - mask)
        sd_f, desc_f = self._describe(mu_f, cov_f)
        sd_b, desc_b = self._describe(mu_b, cov_b)
        m = F.adaptive_avg_pool2d(mask, feats.shape[-2:])
        pool_f = (feats * m).sum((2, 3)) / m.sum((2, 3)).clamp(min=1e-3)
        pool_b = (feats * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3)).clamp(min=1e-3)
        delta = self.mlp(torch.cat([desc_f, desc_b, pool_f, pool_b], dim=1))
        gain = (sd_b / sd_f.clamp(min=0.02)).clamp(0.25, 4.0)
        eye = torch.eye(3, device=composite.device, dtype=composite.dtype)
        mat = torch.diag_embed(gain) + delta[:, :9].reshape(-1, 3, 3)
        bias = mu_b - (mat @ mu_f.unsqueeze(-1)).squeeze(-1) + delta[:, 9:]
        return torch.cat([(mat - eye).flatten(1), bias], dim=1)


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
        self.global_colour = GlobalColour(cfg.widths[-1], cfg.global_hidden) if cfg.head == "global" else None

    def fixed_width_layers(self) -> list[nn.Module]:
        """Layers channel pruning must keep at their width: the per-pixel head (its 6 outputs) and,
        with head=global, the bottleneck's (the MLP reads its pooled features through a path the
        pruner's tracer does not follow)."""
        out: list[nn.Module] = [self.head]
        if self.global_colour is not None:
            out += [m for m in self.encoder.blocks[-1].modules() if isinstance(m, nn.Conv2d)][-1:]
            if self.context is not None:
                out.append(self.context.mix)
        return out

    def transform(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """head=pixel: (B, 6, H, W), gain (tanh-bounded) and bias per channel; head=global:
        (B, 12, H, W), the global matrix ``M − I`` and bias plus the per-pixel residual."""
        x = torch.cat([composite * 2 - 1, mask], dim=1)
        feats = self.encoder(x)
        if self.context is not None:
            feats[-1] = self.context(feats[-1], mask)
        t = self.head(self.decoder(feats))
        local = torch.cat([self.max_gain * torch.tanh(t[:, :3]), torch.tanh(t[:, 3:])], dim=1)
        if self.global_colour is None:
            return local
        g = self.global_colour(composite.float(), mask.float(), feats[-1].float()).to(local.dtype)
        g = g[..., None, None].expand(-1, -1, *local.shape[-2:])
        diag = torch.zeros_like(g[:, :9])
        diag[:, 0::4] = local[:, :3]  # the per-pixel gains on the matrix's diagonal
        return g + torch.cat([diag, local[:, 3:]], dim=1)

    def forward(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return apply_transform(composite, mask, self.transform(composite, mask))
