"""Shared fixtures: one Ray session per test run, tiny configs, temp MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # clients of a `ray start` head (Ray reads it at import)

COMMON = [  # every tiny config: one short epoch, no loader processes, half a CPU per Ray worker
    "train.epochs=1",
    "train.batch_size=8",
    "train.loader_workers=0",
    "train.progress=false",
    "scaling.cpus_per_worker=0.5",
]

TINY_SEG = [
    "model.encoder=tiny",
    "model.pretrained=false",
    "model.decoder_channels=[16,16,8,8,8]",
    "data.source=synthetic",
    "data.size=32",
    "data.synthetic_train=32",
    "data.synthetic_val=8",
    "loss.vgg_weights=random",
    "loss.vgg_layers=[relu1_2]",
    *COMMON,
]


TINY = {
    "segmentation": TINY_SEG,
    "harmonization": [
        "model.widths=[8,16,32]",
        "data.source=synthetic",
        "data.size=32",
        "data.synthetic_train=32",
        "data.synthetic_val=8",
        "loss.vgg_weights=random",
        "loss.vgg_layers=[relu1_2]",
        *COMMON,
    ],
    "pix2pix": [
        "model.ngf=4",
        "model.ndf=4",
        "model.num_downs=5",
        "model.d_layers=2",
        "data.source=synthetic",
        "data.size=32",
        "data.sigma=1.0",
        "data.synthetic_train=32",
        "data.synthetic_val=8",
        "loss.vgg_weights=random",
        "loss.vgg_layers=[relu1_2]",
        *COMMON,
    ],
}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def seg_config(tmp_path: Path):
    """A tiny synthetic segmentation config writing runs and MLflow under tmp_path."""

    def make(*overrides: str):
        return _tiny("segmentation", tmp_path, overrides)

    return make


def _tiny(task: str, tmp_path: Path, overrides, base: list[str] | None = None, yaml: Path | None = None):
    from montage.core.config import load_config
    from montage.core.registry import TASKS

    return load_config(task, TASKS.get(task).spec, yaml, (TINY[task] if base is None else base) + [
        f"run.storage={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
        f"tracking.artifacts={tmp_path / 'mlartifacts'}",
        *overrides,
    ])


@pytest.fixture
def tiny_config(tmp_path: Path):
    """``tiny_config(task, *overrides)``: a tiny synthetic config of any task under tmp_path."""

    def make(task: str, *overrides: str):
        return _tiny(task, tmp_path, overrides)

    return make


@pytest.fixture
def recipe_config(tmp_path: Path):
    """``recipe_config(task, *overrides)``: the packaged ``<task>-tiny.yaml`` recipe (what the demo
    trains) in one process under tmp_path, at the global batch of its configured workers."""

    def make(task: str, *overrides: str):
        from montage.core.paths import packaged_config

        cfg = _tiny(task, tmp_path, ["train.progress=false", "tracking.enabled=false", *overrides], base=[], yaml=packaged_config(f"{task}-tiny"))
        cfg.train.batch_size *= cfg.scaling.workers
        cfg.scaling.workers = 1
        return cfg

    return make
