"""Ray Serve deployments: one per model, batched, hot-swappable through ``user_config``."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from ray import serve

from montage.serve.monitoring import ModelMonitor, version_tag

log = logging.getLogger("montage.serve")


RUNTIMES = ("torch", "onnx", "openvino")


def load_model(task: str, user_config: dict[str, Any]) -> tuple[Any, str, str]:
    """(predictor, label, local checkpoint) of a model deployment's ``user_config``: its ``source``
    (parsed here, where it enters the replica) run by its ``runtime`` (empty: what the source is,
    ``onnx`` for an ONNX file or registered ONNX variant, ``openvino`` for an IR file or registered
    OpenVINO variant, else ``torch``)."""
    from montage.core.sources import ModelSource
    from montage.platform.inference import load_onnx_predictor, load_predictor
    from montage.tracking.sources import resolve_source

    source = ModelSource.parse(user_config["source"], f"{task} source")
    resolved = resolve_source(source, user_config.get("tracking_uri", ""))
    runtime = user_config.get("runtime") or resolved.runtime
    if runtime not in RUNTIMES:
        raise ValueError(f"{task}.runtime: unknown '{runtime}'; valid: {', '.join(RUNTIMES)}")
    if runtime == "torch":
        if resolved.exported is not None:
            raise ValueError(
                f"{source} is an exported model ({resolved.exported.name}): runtime torch cannot run it "
                f"(use {resolved.runtime})"
            )
        return load_predictor(resolved.checkpoint, task=task), resolved.label, str(resolved.checkpoint)
    if resolved.exported is None:
        raise ValueError(
            f"runtime {runtime} serves an exported model — an .onnx file, an OpenVINO IR (openvino only) or a "
            f"registered variant (models:/montage-<task>/<version>, made by `montage export` / `montage optimize`) — "
            f"not {source}"
        )
    if runtime == "openvino":  # an IR, or an ONNX file (OpenVINO reads ONNX directly)
        from montage.platform.ov_runtime import load_openvino_predictor

        predictor = load_openvino_predictor(resolved.exported, resolved.checkpoint, task=task)
    elif resolved.ir is not None:
        raise ValueError(f"{source} is an OpenVINO IR: runtime onnx cannot run it (use openvino)")
    else:
        predictor = load_onnx_predictor(resolved.onnx, resolved.checkpoint, task=task)
    return predictor, resolved.label, str(resolved.checkpoint)


class _ModelDeployment:
    """Shared life cycle: load from ``user_config['source']``, batch size from config."""

    task = ""

    def __init__(self) -> None:
        self.predictor: Any = None
        self.label = ""
        self.arm = "champion"
        self.load_error: dict[str, str] | None = None
        self.monitor = ModelMonitor(self.task)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the configured model and swap it in. A model that fails to load (garbage checkpoint,
        another task's model, missing artifact) while another one serves does not raise (Serve would
        stop this replica): the running model keeps serving, and :meth:`status` (``/healthz``) and
        ``montage serve --reload`` say the reload failed and why."""
        try:
            predictor, label, checkpoint = load_model(self.task, user_config)
        except Exception as exc:
            if self.predictor is None:
                raise  # nothing to keep serving: the deployment fails as before
            self.load_error = {
                "source": user_config.get("source", ""),
                "revision": user_config.get("revision", ""),
                "error": f"{type(exc).__name__}: {exc}",
            }
            log.error(
                "%s reload onto %s failed; still serving %s: %r", self.task, user_config.get("source"), self.label, exc
            )
            return
        self.predictor, self.label = predictor, label  # swap only once the new model is loaded
        self.load_error = None
        self.arm = user_config.get("arm", "champion")
        self.monitor.configure(user_config.get("monitoring"), version_tag(user_config), str(checkpoint), arm=self.arm)
        self._settings(user_config)
        log.info("%s deployment (%s) serves %s", self.task, self.arm, label)

    def _settings(self, user_config: dict[str, Any]) -> None:
        # Ray sets OMP_NUM_THREADS from the replica's num_cpus (1 for a fractional CPU); `threads` overrides
        # it: more threads speed up one forward of a large network, and oversubscribe the cores when several
        # replicas share them under load (tiny models at 16 clients: 13.6 → 6.3 req/s with 2 threads each)
        threads = int(user_config.get("threads", 0))
        if threads > 0:
            import torch  # here, not at the top: the ingress imports this module and runs no network

            torch.set_num_threads(threads)
        for batched in (self.run_batch, getattr(self, "run_batch_tta", None)):
            if batched is not None:
                batched.set_max_batch_size(int(user_config.get("max_batch_size", 8)))
                batched.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.0)))

    async def infer(self, *args: Any) -> tuple[str, Any]:
        """``(version tag, output)``: what the ingress calls, so every answer names its version."""
        version = self.monitor.tags["version"]
        return version, await self(*args)

    def status(self) -> dict[str, Any]:
        """What this replica serves, and the last reload that failed (None when the last one loaded)."""
        return {
            "label": self.label,
            "version": self.monitor.tags["version"],
            "arm": self.arm,
            "reload_error": self.load_error,
        }

    def version(self) -> str:
        return self.label

    def monitor_summary(self) -> dict[str, Any]:
        return self.monitor.summary()

    def quality_samples(self) -> dict[str, list[float]]:
        """The recent per-request no-reference quality values, for comparing arms."""
        return self.monitor.quality_samples()


@serve.deployment(name="Segmenter")
class Segmenter(_ModelDeployment):
    task = "segmentation"

    def _segment(self, images: list[np.ndarray], tta: bool) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = self.predictor(images, tta=tta)
        self.monitor.observe_segmentation(images, out, t0)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return self._segment(images, tta=False)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch_tta(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Requests with ``?tta=true`` (flip averaging: two forward passes), batched apart."""
        return self._segment(images, tta=True)

    async def __call__(self, image: np.ndarray, tta: bool = False) -> np.ndarray:
        """The alpha as uint8 (0–255): a quarter of float32's bytes across the hop (see :func:`unit_alpha`)."""
        alpha = await (self.run_batch_tta if tta else self.run_batch)(image)
        return (alpha * 255).round().astype(np.uint8)


@serve.deployment(name="Harmonizer")
class Harmonizer(_ModelDeployment):
    task = "harmonization"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, items: list[tuple[np.ndarray, np.ndarray, float]]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = []
        for blend in sorted({b for _, _, b in items}):  # one forward per blend value (almost always one)
            idx = [i for i, (_, _, b) in enumerate(items) if b == blend]
            res = self.predictor([items[i][0] for i in idx], [items[i][1] for i in idx], blend=blend)
            out.extend(zip(idx, res))
        results = [r for _, r in sorted(out, key=lambda t: t[0])]
        self.monitor.observe_harmonization(items, results, t0)
        return results

    async def __call__(self, composite: np.ndarray, mask: np.ndarray, blend: float = 1.0) -> np.ndarray:
        return await self.run_batch((composite, mask, blend))


@serve.deployment(name="Pix2Pix")
class Pix2Pix(_ModelDeployment):
    task = "pix2pix"

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_batch(self, inputs: list[Any]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = self.predictor(inputs)
        self.monitor.record_batch(len(inputs), (time.perf_counter() - t0) * 1000)
        return out

    async def __call__(self, landmarks_or_heatmap: Any) -> np.ndarray:
        return await self.run_batch(landmarks_or_heatmap)


def unit_alpha(alpha: np.ndarray) -> np.ndarray:
    """The Segmenter's uint8 alpha back in [0, 1] (float32)."""
    return alpha.astype(np.float32) * (1 / 255)


class LocalModel:
    """A model deployment's class run inside the ingress's own replica (``fused: true``): the
    same loading, batching and monitoring, called like a deployment handle but without the hop
    to another process."""

    DEPLOYMENTS = {"Segmenter": Segmenter, "Harmonizer": Harmonizer, "Pix2Pix": Pix2Pix}

    def __init__(self, impl: Any) -> None:
        self.impl = impl

    @staticmethod
    def spec(deployment: Any, user_config: dict[str, Any]) -> dict[str, Any]:
        return {"deployment": deployment.name, "user_config": user_config}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LocalModel:
        impl = cls.DEPLOYMENTS[spec["deployment"]].func_or_class()
        impl.reconfigure(spec["user_config"])
        return cls(impl)

    async def remote(self, *args: Any) -> Any:
        return await self.impl(*args)

    def __getattr__(self, name: str) -> _LocalMethod:
        if name == "impl":  # not set yet (e.g. while being copied): no recursion
            raise AttributeError(name)
        return _LocalMethod(getattr(self.impl, name))


class _LocalMethod:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        out = self.fn(*args)
        return await out if hasattr(out, "__await__") else out
