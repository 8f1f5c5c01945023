"""The generic loop on a toy regression task (no Ray): steps, accumulation, clipping,
early stopping, best tracking, checkpoints and exact resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from stores import mlflow_store
from torch import nn
from torch.utils.data import Dataset

from montage.core.config import SectionSpec, load_config
from montage.core.registry import TASKS
from montage.launch.local import fit_local
from montage.platform.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from montage.platform.loop import Hook
from montage.platform.task import Modules, Task


@dataclass
class ToyModel:
    hidden: int = 4


@dataclass
class ToyData:
    n: int = 64


@dataclass
class ToyLoss:
    mse: float = 1.0


class Line(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, generator=g) * 2 - 1
        self.y = 2 * self.x + 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


@TASKS.register("toy")
class ToyTask(Task):
    name = "toy"
    monitor = ("val/mse", "min")
    spec = SectionSpec(
        model=ToyModel,
        data=ToyData,
        loss=ToyLoss,
        defaults={"sched.name": "none", "train.loader_workers": 0, "train.progress": False},
    )
    steps = 0

    def build_nets(self, pretrained: bool = True) -> dict[str, nn.Module]:
        torch.manual_seed(0)
        return {
            "net": nn.Sequential(nn.Linear(1, self.cfg.model.hidden), nn.Tanh(), nn.Linear(self.cfg.model.hidden, 1))
        }

    def datasets(self):
        return Line(self.cfg.data.n, 0), Line(16, 1)

    def train_step(self, m: Modules, batch, stepper):
        loss = nn.functional.mse_loss(m["net"](batch["x"]), batch["y"])
        stepper.optimize(loss * self.cfg.loss.mse)
        return {"total": loss.detach()}

    def eval_step(self, m: Modules, batch):
        return {"mse": (m.unwrap("net")(batch["x"]) - batch["y"]).pow(2).flatten(1).mean(1)}

    def samples(self, m, batch):
        return np.zeros((8, 8, 3), np.uint8)


def toy_cfg(tmp_path: Path, *overrides: str):
    return load_config(
        "toy",
        ToyTask.spec,
        None,
        [f"run.storage={tmp_path}", "tracking.enabled=false", "train.batch_size=8", *overrides],
    )


def adam_steps(path: Path) -> int:
    state = load_checkpoint(path)
    return int(next(iter(state["optimizers"]["main"]["state"].values()))["step"])


def test_fit_learns_and_writes_checkpoints(tmp_path: Path) -> None:
    out = fit_local(toy_cfg(tmp_path, "train.epochs=15", "optim.lr=0.05", "run.name=a"))
    assert out.best_value < 0.05
    run = tmp_path / "a"
    assert (run / "best.pt").is_file() and (run / "latest.pt").is_file() and (run / "config.yaml").is_file()
    assert adam_steps(run / "latest.pt") == 15 * 8  # 64 samples / 8 per batch, 15 epochs
    state = load_checkpoint(run / "best.pt", task="toy")
    assert state["best"]["metric"] == "val/mse" and state["epoch"] == out.best_epoch


def test_accumulation_steps_once_per_k_batches(tmp_path: Path) -> None:
    fit_local(toy_cfg(tmp_path, "train.epochs=1", "train.accumulate=3", "run.name=acc"))
    assert adam_steps(tmp_path / "acc" / "latest.pt") == 3  # 8 batches → steps after 3, 6 and the last


def test_grad_clip_bounds_the_update(tmp_path: Path) -> None:
    def first_layer_change(clip: str) -> float:
        name = f"clip{clip}"
        fit_local(
            toy_cfg(
                tmp_path,
                "optim.name=sgd",
                "optim.momentum=0",
                "optim.lr=1.0",
                "train.epochs=1",
                "train.max_steps=1",
                f"train.grad_clip={clip}",
                f"run.name={name}",
            )
        )
        w = load_checkpoint(tmp_path / name / "latest.pt")["nets"]["net"]
        torch.manual_seed(0)
        w0 = nn.Linear(1, 4).state_dict()
        return float((w["0.weight"] - w0["weight"]).norm())

    unclipped, clipped = first_layer_change("0"), first_layer_change("0.01")
    assert clipped <= 0.01 + 1e-6 < unclipped


def test_early_stopping(tmp_path: Path) -> None:
    out = fit_local(toy_cfg(tmp_path, "train.epochs=50", "optim.lr=1e-9", "train.early_stop=2", "run.name=es"))
    assert out.metrics["epoch"] < 50  # lr ~0: no improvement after epoch 1 → stop at epoch 3
    assert out.metrics["epoch"] == 3


def test_resume_continues_exactly(tmp_path: Path) -> None:
    fit_local(
        toy_cfg(
            tmp_path, "train.epochs=4", "optim.lr=0.02", "run.name=straight", "sched.name=cosine_restarts", "sched.t0=2"
        )
    )
    fit_local(
        toy_cfg(
            tmp_path, "train.epochs=2", "optim.lr=0.02", "run.name=split", "sched.name=cosine_restarts", "sched.t0=2"
        )
    )
    resumed = fit_local(
        toy_cfg(tmp_path, "train.epochs=4", "optim.lr=0.02", "sched.name=cosine_restarts", "sched.t0=2"),
        resume=tmp_path / "split",
    )
    assert resumed.metrics["epoch"] == 4
    a = load_checkpoint(tmp_path / "straight" / "latest.pt")
    b = load_checkpoint(tmp_path / "split" / "latest.pt")
    for k in a["nets"]["net"]:
        assert torch.equal(a["nets"]["net"][k], b["nets"]["net"][k]), k
    assert a["schedulers"]["main"]["last_epoch"] == b["schedulers"]["main"]["last_epoch"] == 4


class StopAfter(Hook):
    """Interrupts a run after ``n`` epochs (as a crash would), leaving its latest checkpoint."""

    def __init__(self, n: int) -> None:
        self.n = n

    def after_epoch(self, loop, metrics) -> None:
        if loop.epoch >= self.n:
            loop.should_stop = True


class LrLog(Hook):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def after_epoch(self, loop, metrics) -> None:
        self.lrs.append(metrics["lr"])


def test_onecycle_steps_per_optimizer_step_and_resumes_exactly(tmp_path: Path) -> None:
    over = ["train.epochs=4", "optim.lr=0.02", "sched.name=onecycle", "sched.warmup=0.5"]
    log = LrLog()
    fit_local(toy_cfg(tmp_path, *over, "run.name=straight"), extra_hooks=[log])
    lrs = log.lrs  # after 8, 16, 24, 32 of 32 optimizer steps; the peak (0.02) is at step 16
    assert 0.02 / 25 < lrs[0] < lrs[1] and lrs[1] > lrs[2] > lrs[3]
    assert lrs[1] == pytest.approx(0.02, rel=0.02) and lrs[3] < 0.02 / 1000
    a = load_checkpoint(tmp_path / "straight" / "latest.pt")
    assert a["schedulers"]["main"]["last_epoch"] == 32  # stepped once per optimizer step
    # the same run interrupted after epoch 2, then resumed: identical weights and schedule
    fit_local(toy_cfg(tmp_path, *over, "run.name=split"), extra_hooks=[StopAfter(2)])
    assert load_checkpoint(tmp_path / "split" / "latest.pt")["epoch"] == 2
    fit_local(toy_cfg(tmp_path, *over), resume=tmp_path / "split")
    b = load_checkpoint(tmp_path / "split" / "latest.pt")
    for k in a["nets"]["net"]:
        assert torch.equal(a["nets"]["net"][k], b["nets"]["net"][k]), k
    assert b["schedulers"]["main"]["last_epoch"] == 32


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tmp_path: Path) -> None:
    over = ["train.epochs=8", "train.early_stop=1", "optim.lr=1e-12"]  # no real progress: stops after a plateau
    first = fit_local(toy_cfg(tmp_path, *over, "run.name=plateau"))
    stopped_at = int(first.metrics["epoch"])
    assert stopped_at < 8
    again = fit_local(toy_cfg(tmp_path, *over), resume=tmp_path / "plateau")
    assert again.metrics["epoch"] == stopped_at  # its early stop was kept in the checkpoint: nothing ran
    assert load_checkpoint(tmp_path / "plateau" / "latest.pt")["epoch"] == stopped_at


class Crash(Hook):
    def after_epoch(self, loop, metrics) -> None:
        if loop.epoch == 2:
            raise RuntimeError("boom at epoch 2")


def test_a_crashed_training_marks_its_mlflow_run_failed(tmp_path: Path) -> None:
    import mlflow

    uri = mlflow_store(tmp_path)
    cfg = toy_cfg(
        tmp_path,
        "train.epochs=4",
        "run.name=crash",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        f"tracking.artifacts={tmp_path / 'mlartifacts'}",
        "train.sample_every=0",
    )
    with pytest.raises(RuntimeError, match="boom at epoch 2"):
        fit_local(cfg, extra_hooks=[Crash()])
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("montage-toy").experiment_id]
    )
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED"
    assert "boom at epoch 2" in runs[0].data.tags["montage.error"]
    assert [
        m.step for m in mlflow.MlflowClient(tracking_uri=uri).get_metric_history(runs[0].info.run_id, "val/mse")
    ] == [1, 2]


def test_checkpoint_checks_task_model_and_format(tmp_path: Path) -> None:
    fit_local(toy_cfg(tmp_path, "train.epochs=1", "run.name=c"))
    path = tmp_path / "c" / "latest.pt"
    with pytest.raises(CheckpointError, match="is a 'toy' checkpoint, not 'segmentation'"):
        load_checkpoint(path, task="segmentation")
    with pytest.raises(CheckpointError, match="differs in model.hidden"):
        fit_local(toy_cfg(tmp_path, "train.epochs=2", "model.hidden=8"), resume=tmp_path / "c")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(junk)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a montage checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "montage-checkpoint/1", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    save_checkpoint({"task": "toy", "x": torch.ones(2)}, tmp_path / "ok.pt")
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left no temp file


def test_compiled_nets_train_and_save_bare_weights(tmp_path: Path) -> None:
    # the "eager" backend runs dynamo's capture without a compiler: the plumbing, quickly
    out = fit_local(
        toy_cfg(
            tmp_path,
            "train.epochs=2",
            "optim.lr=0.05",
            "train.compile=default",
            "train.compile_backend=eager",
            "run.name=comp",
        )
    )
    assert out.metrics["val/mse"] < 1.0
    state = load_checkpoint(tmp_path / "comp" / "best.pt", task="toy")
    assert sorted(state["nets"]["net"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # no _orig_mod. prefix
    resumed = fit_local(
        toy_cfg(tmp_path, "train.epochs=3", "train.compile=default", "train.compile_backend=eager"),
        resume=tmp_path / "comp",
    )
    assert resumed.metrics["epoch"] == 3


def test_unwrap_sees_through_compile_and_data_parallel() -> None:
    net = nn.Linear(2, 2)
    m = Modules(nets={"a": torch.compile(nn.DataParallel(net), backend="eager"), "b": net})
    assert m.unwrap("a") is net and m.unwrap("b") is net


def test_epoch_metrics_time_memory_and_startup(tmp_path: Path) -> None:
    import time

    launched = time.time() - 5.0  # as if the command had started 5 s ago
    out = fit_local(toy_cfg(tmp_path, "train.epochs=1", "run.name=t"), launched_at=launched)
    m = out.metrics
    assert 5.0 <= m["time/startup_s"] < 60
    assert 0 < m["time/train_s"] <= m["time/epoch_s"]
    assert m["mem/peak_rss_mb"] > 50  # this process holds torch: tens of MiB at least
    assert "time/startup_s" not in fit_local(toy_cfg(tmp_path, "train.epochs=1", "run.name=t2")).metrics
