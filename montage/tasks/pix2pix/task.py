"""The pix2pix task: landmark heatmaps → faces with a conditional GAN (D step, then G step)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from montage.core.config import OptimConfig, SectionSpec
from montage.nn.losses import VGGFeatures, perceptual_loss
from montage.platform.export import ExportSpec
from montage.platform.imaging import image_grid, write_image
from montage.platform.metrics import psnr, ssim
from montage.platform.task import Batch, Modules, Stepper, Task
from montage.tasks.pix2pix.baselines import warped_mean_faces
from montage.tasks.pix2pix.checks import check_sources
from montage.tasks.pix2pix.data import N_LANDMARKS, GanDataConfig, build_cv_pool, build_datasets, render_heatmaps
from montage.tasks.pix2pix.losses import GanLossConfig, discriminator_loss, generator_adversarial_loss
from montage.tasks.pix2pix.model import GanModelConfig, PatchDiscriminator, UNetGenerator

log = logging.getLogger(__name__)


@dataclass
class GanOptimConfig(OptimConfig):
    """``lr`` is the generator's learning rate, ``lr_d`` the discriminator's."""

    lr_d: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr_d <= 0:
            raise ValueError(f"lr_d must be > 0, got {self.lr_d}")


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """tanh range [-1, 1] → [0, 1]."""
    return (x.float() + 1) / 2


def set_requires_grad(net: nn.Module, flag: bool) -> None:
    for p in net.parameters():
        p.requires_grad_(flag)


def mean_target(dataset: Dataset, limit: int = 512, key: str = "b") -> torch.Tensor | None:
    """The mean of ``key`` (the target image ``b``; ``landmarks``) over up to ``limit`` evenly
    spaced training samples; None when the samples have no ``key``."""
    n = len(dataset)
    idx = np.linspace(0, n - 1, min(n, limit)).round().astype(int)
    items = [dataset[int(i)] for i in np.unique(idx)]
    if not items or key not in items[0]:
        return None
    return torch.stack([item[key] for item in items]).float().mean(0)


class Pix2PixTask(Task):
    name = "pix2pix"
    monitor = ("val/l1", "min")
    export_net = "g"
    optimizer_terms = {"g": "total", "d": "d"}
    optimizer_lr_keys = {"g": "optim.lr", "d": "optim.lr_d"}
    spec = SectionSpec(
        model=GanModelConfig,
        data=GanDataConfig,
        loss=GanLossConfig,
        optim=GanOptimConfig,
        defaults={
            "optim.lr": 2e-4,
            "optim.betas": [0.5, 0.999],
            "sched.name": "linear_decay",
            "sched.constant_epochs": 100,
            "train.epochs": 200,
        },
    )

    def build_nets(self, pretrained: bool = True) -> dict[str, nn.Module]:
        return {"g": UNetGenerator(self.cfg.model), "d": PatchDiscriminator(self.cfg.model)}

    def param_groups(self, nets: dict[str, nn.Module]) -> dict[str, tuple[Any, dict[str, Any]]]:
        return {"g": (nets["g"].parameters(), {}), "d": (nets["d"].parameters(), {"lr": self.cfg.optim.lr_d})}

    def datasets(self) -> tuple[Dataset, Dataset]:
        train, val = build_datasets(self.cfg.data, self.cfg.model.in_channels, cache=self.cfg.train.cache_data)
        self.mean_face = mean_target(train)
        self.mean_landmarks = mean_target(train, key="landmarks")
        return train, val

    def cv_pool(self) -> tuple[Dataset, Dataset]:
        train, plain = build_cv_pool(self.cfg.data, self.cfg.model.in_channels, cache=self.cfg.train.cache_data)
        self.mean_face = mean_target(train)
        self.mean_landmarks = mean_target(train, key="landmarks")
        return train, plain

    @cached_property
    def vgg(self) -> VGGFeatures | None:
        return (
            VGGFeatures(self.cfg.loss.vgg_layers, self.cfg.loss.vgg_weights) if self.cfg.loss.perceptual > 0 else None
        )

    def generator_terms(
        self, d: nn.Module, a: torch.Tensor, fake: torch.Tensor, b: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        terms = {"gan": generator_adversarial_loss(d(a, fake)), "l1": (fake.float() - b.float()).abs().mean()}
        if self.vgg is not None:
            vgg = self.vgg.to(fake.device)
            with torch.no_grad():
                target = vgg(to_unit(b))
            terms["perceptual"] = perceptual_loss(vgg(to_unit(fake)), target)
        return terms

    def train_step(self, m: Modules, batch: Batch, stepper: Stepper) -> dict[str, torch.Tensor]:
        a, b = batch["a"], batch["b"]
        with stepper.autocast():
            fake = m["g"](a)
            # D step: real and fake pairs in one forward (one DDP pass), fake detached from G
            logits = m["d"](torch.cat([a, a]), torch.cat([b, fake.detach()]))
        real_logits, fake_logits = logits.chunk(2)
        loss_d = discriminator_loss(real_logits, fake_logits, self.cfg.loss)
        stepper.optimize(loss_d, "d")
        # G step through the bare D (its weights frozen, no DDP hooks on a pass that trains G only)
        d = m.unwrap("d")
        set_requires_grad(d, False)
        try:
            with stepper.autocast():
                terms = self.generator_terms(d, a, fake, b)
            terms["total"] = self.weighted_total(terms, self.cfg.loss.weights())
            if m.teacher is not None:  # the teacher generator's face as a second target (L1)
                with torch.no_grad(), stepper.autocast():
                    teacher = m.teacher(a)
                terms = self.add_distill(terms, (fake.float() - teacher.float()).abs().mean())
            loss_g = terms.pop("total")
            stepper.optimize(loss_g, "g")
        finally:
            set_requires_grad(d, True)
        return {"d": loss_d.detach(), "total": loss_g.detach(), **{f"g_{k}": v.detach() for k, v in terms.items()}}

    def eval_step(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        g, d = m.unwrap("g"), m.unwrap("d")
        a, b = batch["a"], batch["b"]
        fake = g(a).float()
        real_logits, fake_logits = d(a, b).float(), d(a, fake).float()
        n = a.shape[0]
        bce = nn.functional.binary_cross_entropy_with_logits
        out = {}
        if getattr(self, "mean_face", None) is not None:
            # the baseline a model must beat: the mean training face, whatever the landmarks say
            mean = self.mean_face.to(b.device).unsqueeze(0)
            out["baseline_l1"] = (to_unit(mean) - to_unit(b)).abs().flatten(1).mean(1)
        return out | {
            "l1": (to_unit(fake) - to_unit(b)).abs().flatten(1).mean(1),
            "psnr": psnr(to_unit(fake), to_unit(b)),
            "ssim": ssim(to_unit(fake), to_unit(b)),
            "d_real_acc": (real_logits > 0).float().flatten(1).mean(1),
            "d_fake_acc": (fake_logits < 0).float().flatten(1).mean(1),
            "d_loss": 0.5
            * (
                bce(real_logits, torch.ones_like(real_logits), reduction="none")
                + bce(fake_logits, torch.zeros_like(fake_logits), reduction="none")
            )
            .flatten(1)
            .mean(1),
            "g_gan": bce(fake_logits, torch.ones_like(fake_logits), reduction="none").flatten(1).mean(1),
            "loss": (fake - b).abs().mean().expand(n),
        }

    def check_sources(self) -> dict[str, object]:
        return check_sources(self.cfg.data, self.cfg.model.in_channels)

    def image_metrics(self, pred: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """L1, PSNR and SSIM per sample of images in [-1, 1], on the [0, 1] scale."""
        p, t = to_unit(pred), to_unit(b)
        return {"l1": (p - t).abs().flatten(1).mean(1), "psnr": psnr(p, t), "ssim": ssim(p, t)}

    def baselines(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """The mean training face whatever the landmarks, and (when the samples carry their
        landmarks) the mean face warped piecewise-affinely from the mean landmarks to them."""
        if getattr(self, "mean_face", None) is None:
            raise RuntimeError("pix2pix baselines need the training set's mean face: call datasets() first")
        b = batch["b"].float()
        mean = self.mean_face.to(b.device).unsqueeze(0).expand_as(b)
        out = {"mean_face": self.image_metrics(mean, b)}
        if "landmarks" in batch and getattr(self, "mean_landmarks", None) is not None:
            warped = warped_mean_faces(self.mean_face, self.mean_landmarks.numpy(), batch["landmarks"])
            out["warped_mean_face"] = self.image_metrics(warped.to(b.device), b)
        return out

    def panels(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        fake, b = to_unit(m.unwrap("g")(batch["a"])), to_unit(batch["b"])
        err = ((fake - b).abs().mean(1, keepdim=True) * 4).clamp(0, 1)
        return {"input": to_unit(batch["a"]).amax(dim=1, keepdim=True), "prediction": fake, "truth": b, "error": err}

    def samples(self, m: Modules, batch: Batch) -> np.ndarray:
        fake = m.unwrap("g")(batch["a"])
        heat = to_unit(batch["a"]).amax(dim=1, keepdim=True)
        return image_grid([heat, to_unit(fake), to_unit(batch["b"])])

    # ---------------------------------------------------------------------- inference
    def export_spec(self, nets: dict[str, nn.Module], batch: Batch) -> ExportSpec:
        return ExportSpec(nets["g"], {"heatmap": batch["a"]}, ["face"], multiple=2**self.cfg.model.num_downs)

    def student_overrides(self) -> list[str]:
        return [f"model.ngf={max(4, self.cfg.model.ngf // 2)}"]

    def make_predictor(self, nets: dict[str, nn.Module], device: torch.device) -> "Pix2PixPredictor":
        return Pix2PixPredictor(nets["g"], self.cfg.data.size, self.cfg.data.sigma, self.cfg.model.in_channels, device)

    @classmethod
    def add_predict_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--landmarks", required=True, help='a JSON file {"labels": [[x, y] × 48], "size": S} or a folder of them'
        )
        parser.add_argument("--output", required=True, help="folder for the generated PNGs")

    def predict_cli(self, nets: dict[str, nn.Module], args: argparse.Namespace, device: torch.device) -> list[Path]:
        src = Path(args.landmarks)
        files = [src] if src.is_file() else sorted(src.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no landmark JSON files at {src}")
        predictor = self.make_predictor(nets, device)
        written = []
        for path in files:
            try:
                ann = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: malformed JSON: {exc}") from exc
            image = predictor.from_landmarks([ann.get("labels")], [ann.get("size")])[0]
            dest = Path(args.output) / f"{path.stem}.png"
            write_image(dest, image)
            written.append(dest)
        return written


class Pix2PixPredictor:
    """Landmarks (48 [x, y] in a frame of ``size`` px) or heatmap images → generated faces."""

    def __init__(
        self, g: nn.Module, size: int, sigma: float, channels: int, device: torch.device | str = "cpu"
    ) -> None:
        self.g = g.to(device).eval()
        self.size, self.sigma, self.channels = size, sigma, channels
        self.device = torch.device(device)

    def heatmap(self, labels: Any, frame: Any = None) -> np.ndarray:
        try:
            pts = np.asarray(labels, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"landmarks must be numbers: {exc}") from exc
        if pts.shape != (N_LANDMARKS, 2):
            raise ValueError(f"expected {N_LANDMARKS} [x, y] landmarks, got shape {pts.shape}")
        if not np.isfinite(pts).all():
            raise ValueError("landmarks contain NaN or infinity")
        frame = float(frame or self.size)
        if frame <= 0:
            raise ValueError(f"size must be > 0, got {frame}")
        return render_heatmaps(pts * (self.size / frame), self.size, self.sigma, self.channels)

    @torch.no_grad()
    def generate(self, heatmaps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(C, size, size) heatmaps in [0, 1] → uint8 RGB faces."""
        x = torch.from_numpy(np.stack(heatmaps)).float().to(self.device) * 2 - 1
        out = to_unit(self.g(x)).clamp(0, 1)
        return [(o.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for o in out]

    def from_landmarks(self, labels: Sequence[Any], frames: Sequence[Any] | None = None) -> list[np.ndarray]:
        frames = frames or [None] * len(labels)
        return self.generate([self.heatmap(lab, fr) for lab, fr in zip(labels, frames)])

    def __call__(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Each input: a list of 48 [x, y] (in model pixels) or an HxW uint8 heatmap image."""
        import cv2

        maps = []
        for x in inputs:
            arr = np.asarray(x)
            if arr.ndim == 2 and arr.shape != (N_LANDMARKS, 2):
                img = cv2.resize(arr.astype(np.uint8), (self.size, self.size), interpolation=cv2.INTER_AREA)
                maps.append(np.repeat(img[None].astype(np.float32) / 255, self.channels, axis=0))
            else:
                maps.append(self.heatmap(x))
        return self.generate(maps)
