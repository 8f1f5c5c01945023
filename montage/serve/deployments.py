"""Ray Serve deployments: one per model, batched, hot-swappable through ``user_config``."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

log = logging.getLogger("montage.serve")


def resolve_source(source: str, tracking_uri: str = "") -> tuple[str, str]:
    """A model source → (local checkpoint path, a label for /healthz).

    ``models:/montage-<task>@champion``, ``models:/<name>/<version>`` or a checkpoint path.
    """
    from pathlib import Path

    if source.startswith("models:/"):
        from montage.tracking.registry import download_model_checkpoint, parse_model_uri, resolve_version

        path = download_model_checkpoint(source, tracking_uri)
        label = source
        try:
            name, alias, _ = parse_model_uri(source)
            if alias:
                label = f"{name} v{resolve_version(source, tracking_uri)} (@{alias})"
        except Exception:  # noqa: BLE001 - the label is informational
            pass
        return str(path), label
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source not found: {source}")
    return str(path), str(path)


class _ModelDeployment:
    """Shared life cycle: load from ``user_config['source']``, batch size from config."""

    task = ""

    def __init__(self) -> None:
        self.predictor: Any = None
        self.label = ""

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        from montage.platform.inference import load_onnx_predictor, load_predictor

        if user_config.get("runtime", "torch") == "onnx":
            from montage.tracking.variants import onnx_variant_files

            onnx_path, checkpoint, label = onnx_variant_files(user_config["source"], user_config.get("tracking_uri", ""))
            predictor = load_onnx_predictor(onnx_path, checkpoint, task=self.task)
        else:
            path, label = resolve_source(user_config["source"], user_config.get("tracking_uri", ""))
            predictor = load_predictor(path, task=self.task)
        self.predictor, self.label = predictor, label  # swap only once the new model is loaded
        self.run_batch.set_max_batch_size(int(user_config.get("max_batch_size", 8)))
        self.run_batch.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.01)))
        log.info("%s deployment serves %s", self.task, label)

    def version(self) -> str:
        return self.label


@serve.deployment(name="Segmenter")
class Segmenter(_ModelDeployment):
    task = "segmentation"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return self.predictor(images)

    async def __call__(self, image: np.ndarray) -> np.ndarray:
        return await self.run_batch(image)


@serve.deployment(name="Harmonizer")
class Harmonizer(_ModelDeployment):
    task = "harmonization"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, items: list[tuple[np.ndarray, np.ndarray, float]]) -> list[np.ndarray]:
        out = []
        for blend in sorted({b for _, _, b in items}):  # one forward per blend value (almost always one)
            idx = [i for i, (_, _, b) in enumerate(items) if b == blend]
            res = self.predictor([items[i][0] for i in idx], [items[i][1] for i in idx], blend=blend)
            out.extend(zip(idx, res))
        return [r for _, r in sorted(out, key=lambda t: t[0])]

    async def __call__(self, composite: np.ndarray, mask: np.ndarray, blend: float = 1.0) -> np.ndarray:
        return await self.run_batch((composite, mask, blend))


@serve.deployment(name="Pix2Pix")
class Pix2Pix(_ModelDeployment):
    task = "pix2pix"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, inputs: list[Any]) -> list[np.ndarray]:
        return self.predictor(inputs)

    async def __call__(self, landmarks_or_heatmap: Any) -> np.ndarray:
        return await self.run_batch(landmarks_or_heatmap)
