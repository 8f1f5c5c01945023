"""Person segmentation model: ResNet encoder + attention-gated UNet decoder → alpha logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from montage.nn.losses import IMAGENET_MEAN, IMAGENET_STD
from montage.nn.unet import ENCODERS, UNetDecoder


@dataclass
class SegModelConfig:
    """``encoder``: resnet18 | resnet34 | resnet50 | tiny. ``pretrained`` loads torchvision's
    ImageNet weights (or ``weights_path``, a local ``state_dict`` file, when offline)."""

    encoder: str = "resnet34"
    pretrained: bool = True
    weights_path: str = ""
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    full_res_skip: int = 0  # width of a full-resolution conv block on the input used as the finest skip; 0 = none
    attention: bool = True
    # batch | group: batch statistics are per worker under DDP (and per device: SyncBatchNorm only
    # runs on GPUs); group norm makes the model independent of how a batch is split
    norm: str = "batch"
    encoder_dropout: float = 0.1
    bottleneck_dropout: float = 0.2
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder: unknown encoder '{self.encoder}'; valid: {', '.join(ENCODERS.names())}")
        for p in (self.encoder_dropout, self.bottleneck_dropout):
            if not 0 <= p < 1:
                raise ValueError(f"dropout must be in [0, 1), got {p}")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm: unknown '{self.norm}'; valid: batch, group")


class SegmentationUNet(nn.Module):
    """RGB in [0, 1] (B, 3, H, W) → alpha logits (B, 1, H, W); H, W multiples of 32."""

    def __init__(self, cfg: SegModelConfig) -> None:
        super().__init__()
        self.encoder = ENCODERS.get(cfg.encoder)(
            in_channels=3,
            pretrained=cfg.pretrained,
            weights_path=cfg.weights_path or None,
            dropout=cfg.encoder_dropout,
            bottleneck_dropout=cfg.bottleneck_dropout,
            full_res=cfg.full_res_skip,
            norm=cfg.norm,
        )
        self.decoder = UNetDecoder(
            self.encoder.channels,
            self.encoder.strides,
            cfg.decoder_channels,
            attention=cfg.attention,
            norm=cfg.norm,
            checkpointing=cfg.grad_checkpointing,
        )
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 3, padding=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.head(self.decoder(self.encoder(x)))
