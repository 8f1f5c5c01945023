"""The one seam between the platform and a task.

A task says what to build (networks, optimizers, datasets) and what one step is; the
platform's loop (``loop.py``) owns epochs, devices, AMP, accumulation, clipping,
distribution, checkpoints and tracking. Every task optimizes through
:meth:`Stepper.optimize`, so a GAN stepping D then G needs no special case.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from montage.core.config import ExperimentConfig, SectionSpec

Batch = dict[str, torch.Tensor]


@dataclass
class Modules:
    """The task's networks (possibly DDP-wrapped), optimizers and schedulers, by name."""

    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    teacher: nn.Module | None = None  # frozen, in eval mode (distill.teacher)

    def __getitem__(self, name: str) -> nn.Module:
        return self.nets[name]

    def unwrap(self, name: str) -> nn.Module:
        """The bare module behind a DDP/compile wrapper (for eval, export and state)."""
        net = self.nets[name]
        while True:
            # torch.compile keeps the module as the submodule ``_orig_mod``; DDP as ``module``
            inner = net._modules.get("_orig_mod")
            if inner is None and isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
                inner = net.module
            if inner is None:
                return net
            net = inner


class Stepper(Protocol):
    """What the loop lends a task's ``train_step``."""

    def optimize(self, loss: torch.Tensor, name: str = "main") -> None:
        """Backward ``loss`` (scaled under fp16) and, on an accumulation boundary, clip
        and step optimizer ``name``."""

    def autocast(self) -> Any:
        """The loop's autocast context (a no-op when AMP is off)."""


class Task(ABC):
    """Base class of every task. Subclasses set the class attributes and the abstract steps."""

    name: ClassVar[str]
    spec: ClassVar[SectionSpec]
    monitor: ClassVar[tuple[str, str]]  # (metric, "max" | "min"), e.g. ("val/iou", "max")
    export_net: ClassVar[str] = "net"  # the network export_spec exports (and an ONNX runtime replaces)

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    # -- building ------------------------------------------------------------------
    @abstractmethod
    def build_nets(self, pretrained: bool = True) -> dict[str, nn.Module]:
        """Networks by name; the single-network convention is ``{"net": model}``.
        ``pretrained=False`` skips loading pretrained weights (a checkpoint follows)."""

    def param_groups(self, nets: dict[str, nn.Module]) -> dict[str, tuple[Iterable[nn.Parameter], dict[str, Any]]]:
        """Optimizer name → (parameters, overrides of ``optim`` fields such as ``lr``)."""
        return {"main": (nets["net"].parameters(), {})}

    @abstractmethod
    def datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val) datasets yielding dicts of tensors."""

    def cv_pool(self) -> tuple[Dataset, Dataset]:
        """K-fold cross-validation (``cv.folds``): the training samples twice, index for index,
        as (augmented for training, plain for validation). Default: the training dataset for both
        (a task whose training set augments overrides this so its validation folds do not)."""
        train, _ = self.datasets()
        return train, train

    # which loss term each optimizer minimises and the config key of its learning rate
    # (``montage lr-find`` sweeps each optimizer's LR watching its term)
    optimizer_terms: ClassVar[dict[str, str]] = {"main": "total"}
    optimizer_lr_keys: ClassVar[dict[str, str]] = {"main": "optim.lr"}

    # -- steps -----------------------------------------------------------------------
    @abstractmethod
    def train_step(self, m: Modules, batch: Batch, stepper: Stepper) -> dict[str, torch.Tensor]:
        """One training step; returns named loss terms (``total`` included) for logging."""

    @abstractmethod
    def eval_step(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-sample validation metrics: name → tensor of shape (B,)."""

    @abstractmethod
    def samples(self, m: Modules, batch: Batch) -> np.ndarray:
        """An HxWx3 uint8 grid (input | prediction | target rows) for the tracker."""

    # -- data checks and evaluation ------------------------------------------------------
    def check_sources(self) -> dict[str, Any]:
        """Split name → a :class:`montage.platform.datacheck.CheckSource` over the configured data
        (``montage data check``): every sample read by this task's own loading code."""
        raise NotImplementedError(f"task '{self.name}' has no data check")

    def baselines(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """Classical, no-learning methods scored on a validation ``batch``: baseline name → the
        per-sample metrics :meth:`eval_step` reports for the model (the same keys, shape (B,)),
        measured on the same images, so a table can put the model and each baseline side by side
        (``montage evaluate``, ``bench/quality.py``, the demo). Default: none."""
        return {}

    def panels(self, m: Modules, batch: Batch) -> dict[str, torch.Tensor]:
        """The pictures of each sample of ``batch`` a person compares: input, prediction, truth and
        an error map, each (B, C, H, W) in [0, 1] with C in {1, 3} (``montage evaluate``'s worst cases)."""
        raise NotImplementedError(f"task '{self.name}' has no evaluation panels")

    # -- inference ---------------------------------------------------------------------
    def make_predictor(self, nets: dict[str, nn.Module], device: torch.device) -> Any:
        """A callable: list of inputs → list of outputs at each input's own size."""
        raise NotImplementedError(f"task '{self.name}' has no predictor")

    def export_spec(self, nets: dict[str, nn.Module], batch: Batch) -> Any:
        """The inference network to export and its inputs from a validation ``batch``, as a
        :class:`montage.platform.export.ExportSpec`."""
        raise NotImplementedError(f"task '{self.name}' cannot be exported")

    def from_exported(self, net: nn.Module) -> nn.Module:
        """The exported network (``export_spec``'s module, e.g. run by ONNX Runtime) as the
        training network ``eval_step`` calls (identity unless the export is a part of it)."""
        return net

    def student_overrides(self) -> list[str]:
        """Config overrides of a smaller student of this config (``montage optimize --method distill``)."""
        raise NotImplementedError(f"task '{self.name}' names no default student: pass the student's model.* overrides")

    @classmethod
    def add_predict_args(cls, parser: Any) -> None:
        """Task-specific ``montage predict <task>`` arguments."""
        raise NotImplementedError(f"task '{cls.name}' has no predict command")

    def predict_cli(self, nets: dict[str, nn.Module], args: Any, device: torch.device) -> list[Any]:
        """Run ``montage predict <task>``; returns the files written."""
        raise NotImplementedError(f"task '{self.name}' has no predict command")

    # -- helpers -------------------------------------------------------------------
    def add_distill(self, terms: dict[str, torch.Tensor], distill: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Add the ``distill`` term (when there is a teacher) to ``terms`` and their ``total``."""
        if distill is not None:
            terms["distill"] = distill
            terms["total"] = terms["total"] + self.cfg.distill.weight * distill
        return terms

    @staticmethod
    def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        """Σ weight·term over the terms with a non-zero weight."""
        total = None
        for key, value in terms.items():
            w = weights.get(key, 0.0)
            if w:
                total = value * w if total is None else total + value * w
        if total is None:
            raise ValueError("every loss weight is zero: nothing to optimize")
        return total
