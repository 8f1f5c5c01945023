"""Drift references: statistics of a checkpoint's training inputs (and of its own predictions on
them), stored as ``drift_reference.json`` beside the model when it is registered, and computed
on the fly for versions or checkpoints that have none. Serve compares live requests with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from montage.platform.features import alpha_features, build_reference, colour_change, input_features

log = logging.getLogger(__name__)

REFERENCE_FILE = "drift_reference.json"
DEFAULT_SAMPLES = 256
DRIFT_TASKS = ("segmentation", "harmonization")  # pix2pix takes landmarks: no image statistics


def _training_inputs(inst: Any, limit: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(RGB uint8 input, mask or None) of up to ``limit`` evenly spaced raw training samples
    (before letterboxing and augmentation: what a user would send)."""
    train, _ = inst.datasets()
    source = getattr(train, "source", None)
    if source is None:
        raise ValueError(f"the {inst.name} training dataset exposes no raw source")
    n = len(source)
    for i in np.unique(np.linspace(0, n - 1, min(limit, n)).round().astype(int)):
        if inst.name == "harmonization":
            comp, mask, _ = source.load(int(i), np.random.default_rng([int(getattr(train, "seed", 0)), int(i)]))
            yield comp, mask
        else:
            image, *_ = source.load(int(i))
            yield image, None


def compute_reference(
    checkpoint: str | Path, task: str | None = None, samples: int = DEFAULT_SAMPLES, device: str = "cpu"
) -> dict[str, Any] | None:
    """The drift reference of a checkpoint: input statistics of up to ``samples`` training
    samples of its data config, plus the model's output statistics on them; None for tasks
    without image inputs (pix2pix)."""
    import torch

    from montage.platform.inference import load_for_inference

    inst, nets = load_for_inference(checkpoint, task, device)
    if inst.name not in DRIFT_TASKS:
        return None
    predictor = inst.make_predictor(nets, torch.device(device))
    rows: list[dict[str, float]] = []
    batch: list[tuple[np.ndarray, np.ndarray | None]] = []

    def flush() -> None:
        if not batch:
            return
        images = [b[0] for b in batch]
        if inst.name == "segmentation":
            for img, alpha in zip(images, predictor(images)):
                rows.append({**input_features(img), **alpha_features(alpha)})
        else:
            masks = [b[1] for b in batch]
            for img, m, out in zip(images, masks, predictor(images, masks, blend=1.0)):
                rows.append({**input_features(img), **colour_change(img, out, m)})
        batch.clear()

    for item in _training_inputs(inst, samples):
        batch.append(item)
        if len(batch) == 16:
            flush()
    flush()
    return build_reference(rows, inst.name, source=str(checkpoint))


def write_reference(
    folder: str | Path, checkpoint: str | Path, task: str, samples: int = DEFAULT_SAMPLES
) -> Path | None:
    """Compute the reference of ``checkpoint`` into ``folder/drift_reference.json`` (for the
    model's artifacts). Never fails a registration: a problem is logged and None returned."""
    if task not in DRIFT_TASKS:
        return None
    try:
        ref = compute_reference(checkpoint, task, samples)
    except Exception as exc:  # noqa: BLE001 - the model is registered without a reference; Serve computes one
        log.warning("no drift reference for %s: %s", checkpoint, exc)
        return None
    if ref is None:
        return None
    path = Path(folder) / REFERENCE_FILE
    path.write_text(json.dumps(ref))
    log.info("drift reference of %d %s training samples written to the model's artifacts", ref["samples"], task)
    return path


def find_reference(checkpoint: str | Path, levels: int = 4) -> dict[str, Any] | None:
    """The ``drift_reference.json`` stored with a downloaded model version (found in the folders
    above its checkpoint file), or None."""
    here = Path(checkpoint).resolve()
    for folder in [here, *here.parents][: levels + 1]:
        hit = folder / REFERENCE_FILE
        if hit.is_file():
            return json.loads(hit.read_text())
    return None


def load_or_compute_reference(
    checkpoint: str | Path, task: str, samples: int = DEFAULT_SAMPLES
) -> dict[str, Any] | None:
    """The stored reference of a model version, else one computed now from the checkpoint's data
    (older versions, plain checkpoint sources); None when neither is possible."""
    ref = find_reference(checkpoint)
    if ref is not None:
        return ref
    if task not in DRIFT_TASKS:
        return None
    try:
        ref = compute_reference(checkpoint, task, samples)
    except Exception as exc:  # noqa: BLE001 - drift detection is off for this model, serving is not
        log.warning("no drift reference stored with %s and none could be computed from its data: %s", checkpoint, exc)
        return None
    log.info(
        "computed a drift reference for %s from %d training samples (none stored with the model)",
        checkpoint,
        ref["samples"] if ref else 0,
    )
    return ref
