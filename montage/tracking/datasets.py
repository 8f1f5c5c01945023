"""A run's data in MLflow's dataset tracking: the fingerprint of the data config as a run input."""

from __future__ import annotations

import json
import logging
from typing import Any

from montage.core import schema
from montage.core.config import ExperimentConfig
from montage.platform.loop import Loop

log = logging.getLogger(__name__)


def split_sizes(loop: Loop) -> dict[str, int]:
    out = {}
    for split, loader in (("train", loop.train_loader), ("val", loop.val_loader)):
        try:
            out[split] = len(loader.dataset)
        except (AttributeError, TypeError):
            pass
    return out


def log_data_input(
    client: Any, run_id: str, cfg: ExperimentConfig, splits: dict[str, int], context: str = "training"
) -> str:
    """Log the run's data with MLflow's dataset tracking (``log_inputs``, ``context``):
    a dataset named ``<task>-<source>`` whose digest is the fingerprint's; returns the digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from montage.platform.fingerprint import fingerprint

    fp = fingerprint(cfg.data, splits)
    dataset = Dataset(
        name=f"{cfg.task}-{fp.source}",
        digest=fp.short,
        source_type="local" if fp.roots else "code",
        source=json.dumps({"roots": fp.roots} if fp.roots else {"synthetic": fp.config}, default=str),
        profile=json.dumps(fp.profile()),
    )
    tags = [
        InputTag("mlflow.data.context", context),
        InputTag(schema.DATA_SHA256, fp.digest),
        *(InputTag(schema.data_samples(k), str(v)) for k, v in fp.splits.items()),
    ]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
    client.set_tag(run_id, schema.DATA_DIGEST, fp.short)
    log.info("data %s-%s: digest %s, %d files, splits %s", cfg.task, fp.source, fp.short, fp.files, fp.splits)
    return fp.short
