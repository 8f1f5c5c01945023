"""A tiny image task for the toolbox tests (registered as ``pictures``): smooth random images and
targets 0.5·x + 0.25 (every third sample offset), a two-head network whose aux head can be cut from the
graph, frozen, given a huge input gain or a loss term with a NaN gradient; run in this process, no Ray."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from montage.core.config import SectionSpec, load_config
from montage.core.registry import TASKS
from montage.core.sections import DataSamplingConfig
from montage.platform.task import Modules, Task


@dataclass
class PixModel:
    width: int = 6
    detach_aux: bool = False  # the aux head's output cut from the graph (its term cannot move)
    freeze_aux: bool = False  # the aux head's weights frozen by mistake (still in the optimizer)
    aux_gain: float = 1.0  # the aux head's input scaled: its weight gradient grows with it
    nan_aux: bool = False  # a hand-written RMS of a zero difference in the aux term: finite loss, NaN gradient


@dataclass
class PixData(DataSamplingConfig):
    n: int = 24
    size: int = 16
    offset: float = 0.3  # added to the targets of every third sample (the model cannot tell which)


@dataclass
class PixLoss:
    mse: float = 1.0
    aux: float = 1.0


class Pictures(Dataset):
    """Smooth random images x and targets 0.5·x + 0.25 (sample ``i`` gets a sample-dependent offset)."""

    def __init__(self, n: int, size: int, seed: int, offset: float = 0.3) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size + 2, size + 2, generator=g), 3, 1)
        self.x = x
        self.y = 0.5 * x + 0.25 + offset * (torch.arange(n) % 3 == 0).float().view(n, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "target": self.y[i]}


class TwoHeads(nn.Module):
    def __init__(self, cfg: PixModel) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(1, cfg.width, 3, padding=1)
        self.head = nn.Conv2d(cfg.width, 1, 3, padding=1)
        self.aux = nn.Conv2d(1, 1, 3, padding=1)
        self.cfg = cfg
        if cfg.freeze_aux:
            self.aux.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aux = self.aux(x * self.cfg.aux_gain)
        return self.head(torch.relu(self.body(x))), aux.detach() if self.cfg.detach_aux else aux


@TASKS.register("pictures")
class PicturesTask(Task):
    name = "pictures"
    monitor = ("val/mse", "min")
    spec = SectionSpec(
        model=PixModel,
        data=PixData,
        loss=PixLoss,
        defaults={"sched.name": "none", "train.loader_workers": 0, "train.progress": False, "optim.lr": 0.02},
    )

    def build_nets(self, pretrained: bool = True) -> dict[str, nn.Module]:
        return {"net": TwoHeads(self.cfg.model)}

    def datasets(self):
        d = self.cfg.data
        return Pictures(d.n, d.size, 0, d.offset), Pictures(9, d.size, 1, d.offset)

    def train_step(self, m: Modules, batch, stepper):
        out, aux = m["net"](batch["image"])
        terms = {
            "mse": (out - batch["target"]).pow(2).mean(),
            "aux": (aux - batch["target"]).abs().mean(),
        }
        if self.cfg.model.nan_aux:  # sqrt's gradient at 0 is infinite: 0 · inf = NaN reaches the aux head only
            terms["aux"] = terms["aux"] + (aux - aux.detach()).pow(2).mean().sqrt()
        terms["total"] = self.weighted_total(terms, {"mse": self.cfg.loss.mse, "aux": self.cfg.loss.aux})
        stepper.optimize(terms["total"])
        return {k: v.detach() for k, v in terms.items()}

    def eval_step(self, m: Modules, batch):
        out, _ = m.unwrap("net")(batch["image"])
        return {"mse": (out - batch["target"]).pow(2).flatten(1).mean(1)}

    def samples(self, m, batch):
        return np.zeros((8, 8, 3), np.uint8)


def search(uri: str, query: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("montage-pictures").experiment_id], query)


def pic_cfg(tmp_path: Path, *overrides: str):
    return load_config(
        "pictures",
        PicturesTask.spec,
        None,
        [f"run.storage={tmp_path / 'runs'}", "tracking.enabled=false", "train.batch_size=4", *overrides],
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one torch thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
