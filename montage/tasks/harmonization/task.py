"""The harmonization task: make a pasted foreground match its new background."""

from __future__ import annotations

import argparse
import logging
from functools import cached_property
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from montage.core.config import SectionSpec
from montage.platform.export import ExportSpec
from montage.platform.imaging import ImageError, image_grid, letterbox, read_image, read_mask, write_image
from montage.platform.metrics import fmse_255, mse_255, psnr, ssim
from montage.platform.task import Batch, Modules, Stepper, Task
from montage.platform.transforms import to_tensor_image
from montage.tasks.harmonization.baselines import SPACES, colour_transfer
from montage.tasks.harmonization.checks import check_sources
from montage.tasks.harmonization.data import HarmDataConfig, build_cv_pool, build_datasets
from montage.tasks.harmonization.losses import HarmLossConfig, HarmonizationLoss
from montage.tasks.harmonization.model import HarmModelConfig, HarmonizationUNet, apply_transform

log = logging.getLogger(__name__)


def image_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSE and fMSE on the 0–255 scale, PSNR (dB) and SSIM, per sample."""
    return {
        "mse": mse_255(pred, target),
        "fmse": fmse_255(pred, target, mask),
        "psnr": psnr(pred, target),
        "ssim": ssim(pred, target),
    }


class HarmonizationTask(Task):
    name = "harmonization"
    monitor = ("val/fmse", "min")
    spec = SectionSpec(
        model=HarmModelConfig,
        data=HarmDataConfig,
        loss=HarmLossConfig,
        defaults={"optim.name": "adam", "optim.lr": 5e-5, "optim.weight_decay": 1e-6, "sched.name": "cosine_restarts"},
    )

    def build_nets(self, pretrained: bool = True) -> dict[str, nn.Module]:
        return {"net": HarmonizationUNet(self.cfg.model)}

    def datasets(self) -> tuple[Dataset, Dataset]:
        return build_datasets(self.cfg.data, cache=self.cfg.train.cache_data)

    def cv_pool(self) -> tuple[Dataset, Dataset]:
        return build_cv_pool(self.cfg.data, cache=self.cfg.train.cache_data)

    @cached_property
    def criterion(self) -> HarmonizationLoss:
        return HarmonizationLoss(self.cfg.loss)

    def losses(self, pred: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        terms = self.criterion.to(pred.device)(pred, batch["target"], batch["mask"])
        terms["total"] = self.weighted_total(terms, self.cfg.loss.weights())
        return terms

    def train_step(self, m: Modules, batch: Batch, stepper: Stepper) -> dict[str, torch.Tensor]:
        with stepper.autocast():
            pred = m["net"](batch["composite"], batch["mask"])
        terms = self.losses(pred, batch)
        if m.teacher is not None:  # the teacher's harmonized image as a second target (L1)
            with torch.no_grad(), stepper.autocast():
                teacher = m.teacher(batch["composite"], batch["mask"])
            terms = self.add_distill(terms, (pred.float() - teacher.float()).abs().mean())
        stepper.optimize(terms["total"])
        return {k: v.detach() for k, v in terms.items()}

    def eval_step(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        pred = m.unwrap("net")(batch["composite"], batch["mask"]).float()
        out = image_metrics(pred, batch["target"], batch["mask"])
        out.update(
            {f"baseline_{k}": v for k, v in image_metrics(batch["composite"], batch["target"], batch["mask"]).items()}
        )
        out["loss"] = self.losses(pred, batch)["total"].detach().expand(pred.shape[0])
        return out

    def check_sources(self) -> dict[str, object]:
        return check_sources(self.cfg.data)

    def baselines(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """The composite itself, and the colour-statistics transfer (the foreground's per-channel
        mean and standard deviation moved to the background's) in Lab and in RGB."""
        comp, mask, target = batch["composite"].float(), batch["mask"].float(), batch["target"]
        out = {"composite": image_metrics(comp, target, mask)}
        for space in SPACES:
            out[f"transfer_{space}"] = image_metrics(colour_transfer(comp, mask, space), target, mask)
        return out

    def panels(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        pred = m.unwrap("net")(batch["composite"], batch["mask"]).float()
        err = ((pred - batch["target"]).abs().mean(1, keepdim=True) * 4).clamp(0, 1)
        return {"input": batch["composite"], "prediction": pred, "truth": batch["target"], "error": err}

    def samples(self, m: Modules, batch: Batch) -> np.ndarray:
        pred = m.unwrap("net")(batch["composite"], batch["mask"]).float()
        return image_grid([batch["composite"], batch["mask"], pred, batch["target"]])

    # ---------------------------------------------------------------------- inference
    def export_spec(self, nets: dict[str, nn.Module], batch: Batch) -> ExportSpec:
        # the predictor applies the network's low-resolution transform (gain, bias) at full size:
        # export that, not the composited output
        inputs = {"composite": batch["composite"], "mask": batch["mask"]}
        return ExportSpec(
            TransformOnly(nets["net"]), inputs, ["transform"], multiple=2 ** (len(self.cfg.model.widths) - 1)
        )

    def from_exported(self, net: nn.Module) -> nn.Module:
        return Composited(net)

    def student_overrides(self) -> list[str]:
        widths = [max(4, w // 2) for w in self.cfg.model.widths]
        return [f"model.widths=[{', '.join(map(str, widths))}]"]

    def make_predictor(self, nets: dict[str, nn.Module], device: torch.device) -> "HarmonizationPredictor":
        return HarmonizationPredictor(nets["net"], self.cfg.data.size, device)

    @classmethod
    def add_predict_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--composite", required=True, help="the composite image")
        parser.add_argument("--mask", required=True, help="the foreground mask (grey or RGBA alpha; soft values blend)")
        parser.add_argument("--output", required=True, help="output image file (.png or .jpg)")
        parser.add_argument("--blend", type=float, default=1.0, help="0 = composite, 1 = fully harmonized")
        parser.add_argument("--sharpen", type=float, default=0.0, help="unsharp-mask amount on the foreground")

    def predict_cli(self, nets: dict[str, nn.Module], args: argparse.Namespace, device: torch.device) -> list[Path]:
        comp = read_image(args.composite)
        mask = read_mask(args.mask)
        out = self.make_predictor(nets, device)([comp], [mask], blend=args.blend, sharpen=args.sharpen)[0]
        write_image(args.output, out)
        return [Path(args.output)]


class Composited(nn.Module):
    """An exported transform network (``TransformOnly``, e.g. in ONNX Runtime) as the whole
    harmonization network: ``forward`` composites, ``transform`` is the export."""

    def __init__(self, exported: nn.Module) -> None:
        super().__init__()
        self.exported = exported

    def forward(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return apply_transform(composite, mask, self.exported(composite, mask))

    def transform(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.exported(composite, mask)


class TransformOnly(nn.Module):
    """The harmonization network's ``transform`` as its ``forward`` (what is exported)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net.transform(composite, mask)


class HarmonizationPredictor:
    """Any-size composites + masks → harmonized images of the same size.

    The colour transform is predicted at the model's size from a letterboxed copy, cropped,
    upsampled to full resolution and applied to the original composite; pixels where the
    mask is 0 are copied from the composite, so the background is bit-identical. A soft
    mask blends proportionally; an empty mask returns the composite unchanged.
    """

    def __init__(self, net: nn.Module, size: int, device: torch.device | str = "cpu") -> None:
        self.net = net.to(device).eval()
        self.size = size
        self.device = torch.device(device)

    @staticmethod
    def check(comp: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if comp.ndim != 3 or comp.shape[2] != 3:
            raise ImageError(f"composite must be an RGB image, got shape {comp.shape}")
        if mask.ndim == 3:
            mask = mask[..., -1] if mask.shape[2] in (2, 4) else mask.max(axis=2)
        if mask.shape != comp.shape[:2]:
            raise ImageError(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the composite is {comp.shape[1]}x{comp.shape[0]}"
            )
        return mask

    @torch.no_grad()
    def __call__(
        self, composites: Sequence[np.ndarray], masks: Sequence[np.ndarray], blend: float = 1.0, sharpen: float = 0.0
    ) -> list[np.ndarray]:
        if not 0 <= blend <= 1:
            raise ValueError(f"blend must be in [0, 1], got {blend}")
        masks = [self.check(c, m) for c, m in zip(composites, masks)]
        boxes, xs, ms = [], [], []
        for comp, mask in zip(composites, masks):
            pc, box = letterbox(comp, self.size)
            pm, _ = letterbox(mask, self.size, interpolation=cv2.INTER_LINEAR)
            boxes.append(box)
            xs.append(to_tensor_image(pc))
            ms.append(torch.from_numpy(pm).float().div(255)[None])
        t = self.net.transform(torch.stack(xs).to(self.device), torch.stack(ms).to(self.device)).float().cpu()
        outs = []
        for comp, mask, box, tr in zip(composites, masks, boxes, t):
            if not mask.any():
                outs.append(comp.copy())
                continue
            ih, iw = box.inner
            tr = tr[:, box.top : box.top + ih, box.left : box.left + iw][None]
            c = to_tensor_image(comp)[None]
            a = torch.from_numpy(mask).float().div(255)[None, None]
            res = apply_transform(c, a * blend, tr)[0].permute(1, 2, 0).numpy()
            out = (res * 255).round().astype(np.uint8)
            if sharpen > 0:
                blur = cv2.GaussianBlur(out, (0, 0), 1.0)
                sharp = cv2.addWeighted(out, 1 + sharpen, blur, -sharpen, 0)
                fg = (mask > 0)[..., None]
                out = np.where(fg, sharp, out)
            out[mask == 0] = comp[mask == 0]
            outs.append(out)
        return outs
