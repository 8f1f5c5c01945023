"""Loss building blocks shared by tasks: VGG perceptual features, Gram style, Sobel edges, Dice."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from montage.nn.unet import PretrainedWeightsError

log = logging.getLogger(__name__)

# indices of the ReLU outputs in torchvision's vgg16().features
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# torchvision's VGG16 configuration "D": output channels of each 3x3 convolution, "M" a 2x2 max-pool
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features(depth: int) -> nn.Sequential:
    """The first ``depth`` layers of torchvision's ``vgg16().features``, with the same indices (so a VGG16
    ``state_dict``'s ``features.<i>.*`` entries load into it): the network without its classifier, whose
    102M parameters a perceptual loss never uses and would spend ~1.5 s of CPU and ~1 GB initialising."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    return nn.Sequential(*layers[:depth])


class VGGFeatures(nn.Module):
    """Frozen VGG16 feature taps for perceptual and style losses.

    ``weights``: ``"imagenet"`` (torchvision download or cache), a path to a VGG16
    ``state_dict`` file, or ``"random"`` (seeded random init: offline tests and demos).
    Inputs are RGB in [0, 1]; ImageNet normalisation is applied here.
    """

    def __init__(
        self, layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3"), weights: str = "imagenet"
    ) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown or not layers:
            raise ValueError(f"unknown VGG16 layers {unknown}; valid: {', '.join(VGG16_LAYERS)}")
        self.taps = sorted(VGG16_LAYERS[name] for name in layers)
        depth = self.taps[-1] + 1
        if weights == "random":
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(0)  # the same "random VGG" on every rank and run
            self.features = vgg16_features(depth)
            for m in self.features.modules():
                if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.constant_(m.bias, 0)
            torch.random.set_rng_state(gen_state)
        else:
            self.features = vgg16_features(depth)
            state = _vgg16_state_dict(weights)
            features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
            self.features.load_state_dict({k: v for k, v in features.items() if int(k.split(".")[0]) < depth})
        self.features.eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)  # always frozen, BN-free but keep eval semantics

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x.float() - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def _vgg16_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """A VGG16 ``state_dict``: torchvision's ImageNet weights (``"imagenet"``: download or cache) or a file."""
    if weights == "imagenet":
        import torchvision

        w = torchvision.models.VGG16_Weights.IMAGENET1K_V1
        try:
            return w.get_state_dict(progress=False)
        except Exception as exc:
            raise PretrainedWeightsError(
                f"cannot fetch VGG16 ImageNet weights ({w.url}): {exc}. Offline? Put the file at "
                f"{Path(torch.hub.get_dir()) / 'checkpoints' / Path(w.url).name}, or set the loss's "
                f"vgg_weights=/path/to/vgg16.pth, or vgg_weights=random for offline tests"
            ) from exc
    path = Path(weights)
    if not path.is_file():
        raise PretrainedWeightsError(f"VGG16 weights file not found: {path} (vgg_weights: imagenet | random | a path)")
    return torch.load(path, map_location="cpu", weights_only=True)


def perceptual_loss(fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 distance between matching feature maps."""
    return sum(F.l1_loss(a, b) for a, b in zip(fa, fb)) / len(fa)


def gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix of features (B, C, H, W) → (B, C, C), normalised by C·H·W."""
    b, c, h, w = x.shape
    f = x.reshape(b, c, h * w).float()
    return f @ f.transpose(1, 2) / (c * h * w)


def style_loss(fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared distance between Gram matrices of matching feature maps."""
    return sum(F.mse_loss(gram(a), gram(b)) for a, b in zip(fa, fb)) / len(fa)


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradients of a (B, C, H, W) map → (B, 2C, H, W) [gx..., gy...], replicate padding."""
    c = x.shape[1]
    kx = _SOBEL_X.to(x)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3)
    k = k.repeat(c, 1, 1, 1)  # (2C, 1, 3, 3), grouped per channel
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return torch.cat([g[:, 0::2], g[:, 1::2]], dim=1)


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between Sobel gradients of ``pred`` and ``target``."""
    return F.l1_loss(sobel(pred), sobel(target))


def distill_kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-pixel Bernoulli KL(teacher ‖ student) of logits softened by ``temperature``, times
    T² (Hinton et al.'s scaling, so the gradient size does not shrink with T); 0 when equal."""
    t, s = teacher.float() / temperature, student.float() / temperature
    pt = torch.sigmoid(t)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * temperature**2


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − (2·Σpt + eps) / (Σp + Σt + eps), per sample, averaged over the batch."""
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()
