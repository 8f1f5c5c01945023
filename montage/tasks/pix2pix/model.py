"""pix2pix networks: a UNet generator (unet_256 style) and a PatchGAN discriminator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from montage.nn.unet import norm_layer


@dataclass
class GanModelConfig:
    """``num_downs`` 8 suits 256 px (down to 1×1); inputs must be divisible by 2**num_downs.
    Tests use ngf=ndf=8, num_downs=5 at 32 px."""

    in_channels: int = 1
    out_channels: int = 3
    ngf: int = 64
    num_downs: int = 8
    dropout: float = 0.5  # in the three decoder blocks after the innermost
    ndf: int = 64
    d_layers: int = 3  # 3 → the 70×70 PatchGAN
    norm: str = "batch"
    grad_checkpointing: bool = False  # G recomputes its blocks' activations in backward: less memory, more compute
    # > 0: the last transposed conv gives this many features instead of the image, and two 3×3 convs
    # on them and the condition itself (full resolution) draw the image; 0 = pix2pix's own output layer
    refine: int = 0

    def __post_init__(self) -> None:
        if self.num_downs < 2 or self.d_layers < 1:
            raise ValueError("num_downs must be >= 2 and d_layers >= 1")
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")
        if self.norm not in ("batch", "instance", "none"):
            raise ValueError(f"norm: unknown '{self.norm}'; valid: batch, instance, none")


class UNetGenerator(nn.Module):
    """Encoder C64-C128-C256-C512-... (4×4 stride-2 convs, LeakyReLU 0.2), decoder of 4×4
    transposed convs with skips, dropout in the innermost decoder blocks, tanh output."""

    def __init__(self, cfg: GanModelConfig) -> None:
        super().__init__()
        widths = [min(cfg.ngf * 2**i, cfg.ngf * 8) for i in range(cfg.num_downs)]
        self.downs = nn.ModuleList()
        cin = cfg.in_channels
        for i, w in enumerate(widths):
            innermost, outermost = i == len(widths) - 1, i == 0
            # not in place: the block's input is the previous level's skip (and a checkpoint's saved input)
            layers: list[nn.Module] = [] if outermost else [nn.LeakyReLU(0.2)]
            layers.append(nn.Conv2d(cin, w, 4, 2, 1, bias=cfg.norm != "batch" or outermost or innermost))
            if not (outermost or innermost):
                layers.append(norm_layer(cfg.norm, w))
            self.downs.append(nn.Sequential(*layers))
            cin = w
        self.ups = nn.ModuleList()
        n = len(widths)
        for i in range(n - 1, 0, -1):  # from the innermost up to the second level
            cin_up = widths[i] if i == n - 1 else widths[i] * 2
            layers = [
                nn.ReLU(),
                nn.ConvTranspose2d(cin_up, widths[i - 1], 4, 2, 1, bias=cfg.norm != "batch"),
                norm_layer(cfg.norm, widths[i - 1]),
            ]
            if cfg.dropout and n - 4 <= i <= n - 2:  # the three blocks next to the innermost
                layers.append(nn.Dropout(cfg.dropout))
            self.ups.append(nn.Sequential(*layers))
        if cfg.refine:
            self.out = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(widths[0] * 2, cfg.refine, 4, 2, 1))
            self.refine = nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(cfg.refine + cfg.in_channels, cfg.refine, 3, 1, 1),
                nn.ReLU(),
                nn.Conv2d(cfg.refine, cfg.out_channels, 3, 1, 1),
                nn.Tanh(),
            )
        else:
            self.out = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(widths[0] * 2, cfg.out_channels, 4, 2, 1), nn.Tanh())
            self.refine = None
        self.divisor = 2**cfg.num_downs
        self.checkpointing = cfg.grad_checkpointing

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)  # dropout masks are replayed (RNG state kept)
        return block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise ValueError(f"input {tuple(x.shape[-2:])} must be divisible by {self.divisor} (2**num_downs)")
        condition = x
        skips: list[torch.Tensor] = []
        for i, down in enumerate(self.downs):
            if i:
                # the block's leading LeakyReLU, applied once: its output is the block's input and
                # the previous level's skip (pix2pix's reference applies it in place, so skips are activated)
                x = skips[-1] = down[0](x)
                down = down[1:]
            x = self._run(down, x)
            skips.append(x)
        x = skips.pop()
        for up in self.ups:
            x = torch.cat([self._run(up, x), skips.pop()], dim=1)
        x = self._run(self.out, x)
        if self.refine is None:
            return x
        return self._run(self.refine, torch.cat([x, condition], dim=1))


class PatchDiscriminator(nn.Module):
    """PatchGAN: C64-C128-C256 (stride 2) - C512 (stride 1) - 1 logit map; 70×70 receptive
    field with 3 layers, 30×30 logits at 256 px. Input: concat(condition, image)."""

    def __init__(self, cfg: GanModelConfig) -> None:
        super().__init__()
        cin = cfg.in_channels + cfg.out_channels
        layers: list[nn.Module] = [nn.Conv2d(cin, cfg.ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, cfg.d_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < cfg.d_layers else 1
            layers += [
                nn.Conv2d(cfg.ndf * prev, cfg.ndf * mult, 4, stride, 1, bias=cfg.norm != "batch"),
                norm_layer(cfg.norm, cfg.ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(cfg.ndf * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([condition, image], dim=1))
