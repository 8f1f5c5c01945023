"""UNet parts shared by every task: encoders, attention gates, the decoder.

A model is encoder + :class:`UNetDecoder` + a head, assembled by the task. Encoders
return a list of feature maps from fine to coarse and expose ``channels`` (one per map)
and ``strides`` (the downsampling of each map relative to the input).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from montage.core.registry import Registry

log = logging.getLogger(__name__)

ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be found or downloaded."""


def norm_layer(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, ch), ch)  # up to 8 groups that divide the channels
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}'; valid: batch, instance, group, none")


class ConvBlock(nn.Sequential):
    """(conv3x3 → norm → ReLU) × 2."""

    def __init__(self, cin: int, cout: int, norm: str = "batch", dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=norm == "none"),
            norm_layer(norm, cout),
            nn.ReLU(inplace=True),
        ]
        if dropout:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class AttentionGate(nn.Module):
    """Additive attention on a skip connection: α = σ(ψ(ReLU(W_g·g + W_x·x + b))), out = α·x.

    ``g`` is the gating signal from the coarser decoder level, already upsampled to the
    skip's resolution. The module keeps no state: :meth:`UNetDecoder.attention_maps` recomputes
    the coefficients for inspection.
    """

    def __init__(self, g_ch: int, x_ch: int, inter_ch: int) -> None:
        super().__init__()
        self.w_g = nn.Conv2d(g_ch, inter_ch, 1, bias=True)  # carries the bias b
        self.w_x = nn.Conv2d(x_ch, inter_ch, 1, bias=False)
        self.psi = nn.Conv2d(inter_ch, 1, 1, bias=True)

    def coefficients(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """α, (B, 1, H, W) in (0, 1)."""
        return torch.sigmoid(self.psi(F.relu(self.w_g(g) + self.w_x(x))))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.coefficients(g, x)


class DecoderBlock(nn.Module):
    """Upsample ×2, gate the skip (optional), concatenate, ConvBlock."""

    def __init__(
        self, cin: int, skip: int, cout: int, attention: bool = False, norm: str = "batch", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.gate = AttentionGate(cin, skip, max(1, skip // 2)) if attention and skip else None
        self.conv = ConvBlock(cin + skip, cout, norm=norm, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            if self.gate is not None:
                skip = self.gate(x, skip)
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNetDecoder(nn.Module):
    """Decodes encoder features (fine → coarse) back to full resolution.

    One block per skip from the coarsest up; when the finest feature is below full
    resolution (ResNet stems are at /2), extra skip-less blocks reach stride 1.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_strides: Sequence[int],
        decoder_channels: Sequence[int],
        attention: bool = False,
        norm: str = "batch",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        skips = list(encoder_channels[:-1])[::-1]  # coarse → fine, bottleneck excluded
        extra = int(math.log2(encoder_strides[0]))  # skip-less blocks from the finest feature to stride 1
        n_blocks = len(skips) + extra
        if len(decoder_channels) != n_blocks:
            raise ValueError(
                f"decoder needs {n_blocks} channel widths for these encoder features, got {len(decoder_channels)}"
            )
        blocks = []
        cin = encoder_channels[-1]
        for i, cout in enumerate(decoder_channels):
            skip = skips[i] if i < len(skips) else 0
            blocks.append(DecoderBlock(cin, skip, cout, attention=attention, norm=norm))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = cin
        self.checkpointing = checkpointing

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        skips = feats[:-1][::-1]
        x = feats[-1]
        for i, block in enumerate(self.blocks):
            skip = skips[i] if i < len(skips) else None
            if self.checkpointing and self.training:
                x = checkpoint(block, x, skip, use_reentrant=False)
            else:
                x = block(x, skip)
        return x

    @torch.no_grad()
    def attention_maps(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The attention coefficients of every gate (coarse → fine) for encoder features ``feats``."""
        maps: list[torch.Tensor] = []
        gates = [b.gate for b in self.blocks if b.gate is not None]
        handles = [g.register_forward_hook(lambda m, inputs, _out: maps.append(m.coefficients(*inputs))) for g in gates]
        try:
            self(feats)
        finally:
            for h in handles:
                h.remove()
        return maps


# ----------------------------------------------------------------------------- encoders


class ResNetEncoder(nn.Module):
    """A torchvision ResNet's stem and four stages as a feature pyramid (/2 … /32).

    ``full_res`` > 0 adds a ConvBlock of that width on the input itself as the finest
    feature (/1): a ResNet stem halves the size twice before its first stage, so without
    it the decoder sees nothing finer than /2 and thin structures (2–3 px arms at 64 px,
    hair at any size) blur.
    """

    def __init__(
        self,
        resnet: nn.Module,
        channels: Sequence[int],
        in_channels: int = 3,
        dropout: float = 0.0,
        bottleneck_dropout: float = 0.0,
        full_res: int = 0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.full_res = ConvBlock(in_channels, full_res, norm=norm) if full_res else None
        if in_channels != 3:
            old = resnet.conv1
            resnet.conv1 = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu)
        self.pool = resnet.maxpool
        self.stages = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        self.drop = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.bottleneck_drop = nn.Dropout2d(bottleneck_dropout) if bottleneck_dropout else nn.Identity()
        self.channels = ([full_res] if full_res else []) + list(channels)
        self.strides = ([1] if full_res else []) + [2, 4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        fine = [self.full_res(x)] if self.full_res is not None else []
        feats = fine + [self.stem(x)]
        x = self.pool(feats[-1])
        for i, stage in enumerate(self.stages):
            x = stage(x)
            x = self.bottleneck_drop(x) if i == len(self.stages) - 1 else self.drop(x)
            feats.append(x)
        return feats


def _load_resnet(name: str, pretrained: bool, weights_path: str | None) -> nn.Module:
    import torchvision

    ctor = getattr(torchvision.models, name)
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise PretrainedWeightsError(f"encoder weights file not found: {path}")
        model = ctor(weights=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        log.info("loaded %s weights from %s", name, path)
        return model
    if not pretrained:
        return ctor(weights=None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return ctor(weights=weights)
    except Exception as exc:  # URLError, HTTPError, OSError when offline
        raise PretrainedWeightsError(
            f"cannot fetch ImageNet weights for {name} ({weights.url}): {exc}. Offline? Put the file at "
            f"{Path(torch.hub.get_dir()) / 'checkpoints' / Path(weights.url).name}, or set "
            f"model.weights_path=/path/to/{Path(weights.url).name}, or model.pretrained=false"
        ) from exc


def _torchvision_encoder(name: str, channels: Sequence[int]) -> Callable[..., nn.Module]:
    def build(
        in_channels: int = 3,
        pretrained: bool = False,
        weights_path: str | None = None,
        dropout: float = 0.0,
        bottleneck_dropout: float = 0.0,
        full_res: int = 0,
        norm: str = "batch",
    ) -> nn.Module:
        if norm != "batch":
            raise ValueError(
                f"norm '{norm}': the {name} encoder is torchvision's, with batch norm (its ImageNet weights need it); "
                "group norm is available for the tiny and small encoders; across GPUs use scaling.sync_batchnorm=true"
            )
        return ResNetEncoder(
            _load_resnet(name, pretrained, weights_path), channels, in_channels, dropout, bottleneck_dropout, full_res
        )

    return build


ENCODERS.register("resnet18")(_torchvision_encoder("resnet18", [64, 64, 128, 256, 512]))
ENCODERS.register("resnet34")(_torchvision_encoder("resnet34", [64, 64, 128, 256, 512]))
ENCODERS.register("resnet50")(_torchvision_encoder("resnet50", [64, 256, 512, 1024, 2048]))


class _BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convs and a shortcut), laid out as torchvision's ``BasicBlock``.

    The same submodules in the same order, so the same seed gives the same weights and the same
    ``state_dict`` keys. Written here because importing torchvision (whose ``ops`` import
    ``torch._dynamo``) costs ~2.4 s of CPU in every training worker and Serve replica that builds
    a tiny encoder; the torchvision encoders still use torchvision's own.
    """

    def __init__(
        self, cin: int, cout: int, stride: int, downsample: nn.Module | None, make_norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(cout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _TinyResNet(nn.Module):
    """A ResNet of basic blocks at tiny widths (tests, CPU demos)."""

    def __init__(self, widths: Sequence[int], norm: str = "batch") -> None:
        super().__init__()

        def make_norm(ch: int) -> nn.Module:
            return norm_layer(norm, ch)

        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = make_norm(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, w in enumerate(widths[1:], start=1):
            stride = 1 if i == 1 else 2
            down = None
            if stride != 1 or cin != w:
                down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), make_norm(w))
            setattr(self, f"layer{i}", _BasicBlock(cin, w, stride, down, make_norm))
            cin = w


def _tiny_encoder(name: str, widths: Sequence[int]) -> Callable[..., nn.Module]:
    def build(
        in_channels: int = 3,
        pretrained: bool = False,
        weights_path: str | None = None,
        dropout: float = 0.0,
        bottleneck_dropout: float = 0.0,
        full_res: int = 0,
        norm: str = "batch",
    ) -> nn.Module:
        if pretrained or weights_path:
            raise PretrainedWeightsError(f"the '{name}' encoder has no pretrained weights; use resnet18/34/50")
        return ResNetEncoder(
            _TinyResNet(widths, norm), widths, in_channels, dropout, bottleneck_dropout, full_res, norm
        )

    return build


ENCODERS.register("tiny")(_tiny_encoder("tiny", [8, 8, 16, 16, 32]))  # tests
ENCODERS.register("small")(_tiny_encoder("small", [16, 16, 32, 64, 128]))  # CPU demos at 64 px


class ConvEncoder(nn.Module):
    """A plain UNet encoder: ConvBlock at full resolution, then (maxpool → ConvBlock) per level."""

    def __init__(
        self, in_channels: int, widths: Sequence[int], norm: str = "batch", bottleneck_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths):
            drop = bottleneck_dropout if i == len(widths) - 1 else 0.0
            self.blocks.append(ConvBlock(cin, w, norm=norm, dropout=drop))
            cin = w
        self.channels = list(widths)
        self.strides = [2**i for i in range(len(widths))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats
