"""The segmentation task: person photo → alpha matte → RGBA cut-out."""

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
from montage.nn.losses import distill_kl_logits
from montage.platform.export import ExportSpec
from montage.platform.imaging import Letterbox, image_grid, letterbox, list_images, read_image, restore, write_image
from montage.platform.metrics import alpha_metrics, binary_metrics, trimap_metrics
from montage.platform.task import Batch, Modules, Stepper, Task
from montage.platform.transforms import to_tensor_image
from montage.tasks.segmentation.baselines import grabcut
from montage.tasks.segmentation.data import SegDataConfig, build_cv_pool, build_datasets, check_sources
from montage.tasks.segmentation.losses import SegLossConfig, SegmentationLoss
from montage.tasks.segmentation.model import SegmentationUNet, SegModelConfig

log = logging.getLogger(__name__)


class SegmentationTask(Task):
    name = "segmentation"
    monitor = ("val/iou", "max")
    spec = SectionSpec(
        model=SegModelConfig,
        data=SegDataConfig,
        loss=SegLossConfig,
        defaults={"optim.name": "adamw", "optim.lr": 3e-4, "optim.weight_decay": 1e-4},
    )

    def build_nets(self, pretrained: bool = True) -> dict[str, nn.Module]:
        mcfg = self.cfg.model
        if not pretrained:
            mcfg = type(mcfg)(**{**vars(mcfg), "pretrained": False, "weights_path": ""})
        return {"net": SegmentationUNet(mcfg)}

    def datasets(self) -> tuple[Dataset, Dataset]:
        return build_datasets(self.cfg.data, cache=self.cfg.train.cache_data)

    def cv_pool(self) -> tuple[Dataset, Dataset]:
        return build_cv_pool(self.cfg.data, cache=self.cfg.train.cache_data)

    @cached_property
    def criterion(self) -> SegmentationLoss:
        return SegmentationLoss(self.cfg.loss)

    def losses(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        crit = self.criterion.to(logits.device)
        terms = crit(logits, batch["mask"], batch["image"], batch.get("valid"))
        terms["total"] = self.weighted_total(terms, self.cfg.loss.weights())
        return terms

    def train_step(self, m: Modules, batch: Batch, stepper: Stepper) -> dict[str, torch.Tensor]:
        with stepper.autocast():
            logits = m["net"](batch["image"])
        terms = self.losses(logits, batch)
        if m.teacher is not None:
            with torch.no_grad(), stepper.autocast():
                teacher = m.teacher(batch["image"])
            terms = self.add_distill(terms, distill_kl_logits(logits, teacher, self.cfg.distill.temperature))
        stepper.optimize(terms["total"])
        return {k: v.detach() for k, v in terms.items()}

    def eval_step(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        logits = m.unwrap("net")(batch["image"]).float()
        prob = torch.sigmoid(logits)
        out = self.mask_metrics(prob, batch)
        terms = self.losses(logits, batch)
        out["loss"] = terms["total"].detach().expand(prob.shape[0])
        return out

    def mask_metrics(self, prob: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample binary, alpha and trimap metrics of an alpha map ``prob`` in [0, 1]."""
        valid = batch.get("valid", torch.ones_like(prob))
        target = batch["mask"]
        pred_bin = (prob > 0.5) & (valid > 0)
        out = binary_metrics(pred_bin, (target > 0.5) & (valid > 0))
        out.update({f"alpha_{k}": v for k, v in alpha_metrics(prob * valid, target * valid).items()})
        out.update(
            {
                f"trimap_{k}": v
                for k, v in trimap_metrics(prob * valid, target * valid, self.cfg.data.trimap_band).items()
            }
        )
        return out

    def check_sources(self) -> dict[str, object]:
        return check_sources(self.cfg.data)

    def baselines(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """``background``: an all-background mask; ``grabcut``: OpenCV's GrabCut (5 iterations)
        initialised from the true mask's bounding box."""
        target = batch["mask"].float()
        return {
            "background": self.mask_metrics(torch.zeros_like(target), batch),
            "grabcut": self.mask_metrics(grabcut(batch["image"], batch["mask"]).to(target.device), batch),
        }

    def panels(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        prob = torch.sigmoid(m.unwrap("net")(batch["image"]).float())
        return {
            "input": batch["image"],
            "prediction": prob,
            "truth": batch["mask"],
            "error": (prob - batch["mask"]).abs(),
        }

    def samples(self, m: Modules, batch: Batch) -> np.ndarray:
        prob = torch.sigmoid(m.unwrap("net")(batch["image"]).float())
        image = batch["image"].float()
        return image_grid([image, prob, batch["mask"], image * prob])

    # ---------------------------------------------------------------------- inference
    @classmethod
    def add_predict_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", required=True, help="an image file or a folder of images")
        parser.add_argument("--output", required=True, help="folder for the RGBA PNG cut-outs")
        parser.add_argument("--tta", action="store_true", help="average with the horizontally flipped prediction")
        parser.add_argument("--threshold", type=float, default=None, help="binarise alpha at this value")

    def export_spec(self, nets: dict[str, nn.Module], batch: Batch) -> ExportSpec:
        return ExportSpec(nets["net"], {"image": batch["image"]}, ["alpha_logits"], multiple=32)

    STUDENT_ENCODER = {
        "resnet50": "resnet18",
        "resnet34": "small",
        "resnet18": "small",
        "small": "tiny",
        "tiny": "tiny",
    }

    def student_overrides(self) -> list[str]:
        m = self.cfg.model
        decoder = ", ".join(str(max(4, c // 2)) for c in m.decoder_channels)
        return [
            f"model.encoder={self.STUDENT_ENCODER.get(m.encoder, 'tiny')}",
            "model.pretrained=false",
            f"model.decoder_channels=[{decoder}]",
            f"model.full_res_skip={m.full_res_skip // 2}",
        ]

    def make_predictor(
        self, nets: dict[str, nn.Module], device: torch.device, tta: bool = False
    ) -> "SegmentationPredictor":
        return SegmentationPredictor(nets["net"], self.cfg.data.size, device, tta=tta)

    def predict_cli(self, nets: dict[str, nn.Module], args: argparse.Namespace, device: torch.device) -> list[Path]:
        predictor = self.make_predictor(nets, device, tta=args.tta)
        src = Path(args.input)
        files = [src] if src.is_file() else list_images(src)
        if not files:
            raise FileNotFoundError(f"no images in {src}")
        out_dir = Path(args.output)
        written = []
        for path in files:
            image = read_image(path)
            alpha = predictor([image])[0]
            if args.threshold is not None:
                alpha = (alpha >= args.threshold).astype(np.float32)
            rgba = np.dstack([image, (alpha * 255).round().astype(np.uint8)])
            dest = out_dir / f"{path.stem}.png"
            write_image(dest, rgba)
            written.append(dest)
            log.info("%s → %s", path, dest)
        return written


class SegmentationPredictor:
    """Any-size RGB uint8 images → alpha in [0, 1] at each image's own size."""

    def __init__(self, net: nn.Module, size: int, device: torch.device | str = "cpu", tta: bool = False) -> None:
        self.net = net.to(device).eval()
        self.size = size
        self.device = torch.device(device)
        self.tta = tta

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], tta: bool | None = None) -> list[np.ndarray]:
        """``tta`` (default: the predictor's setting) averages with the horizontally flipped
        image's prediction: two forward passes."""
        boxes: list[Letterbox] = []
        tensors = []
        for img in images:
            padded, box = letterbox(img, self.size)
            boxes.append(box)
            tensors.append(to_tensor_image(padded))
        x = torch.stack(tensors).to(self.device)
        prob = torch.sigmoid(self.net(x).float())
        if self.tta if tta is None else tta:
            prob = 0.5 * (prob + torch.sigmoid(self.net(x.flip(-1)).float()).flip(-1))
        prob = prob[:, 0].cpu().numpy()
        return [np.clip(restore(p, box, cv2.INTER_LINEAR), 0, 1) for p, box in zip(prob, boxes)]
