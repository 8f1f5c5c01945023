"""Production monitoring of the Serve graph with Ray Serve's metrics API.

Ray's metrics agent exports every series on each node's metrics port in Prometheus text
(``ray_`` prefix, counters ``_total``); ``deploy/prometheus`` scrapes it and
``deploy/grafana/montage.json`` charts it. The ingress holds an :class:`IngressMonitor`
(requests, errors by status, latency per endpoint and stage, input sizes; recorded by the
:class:`RequestMetrics` ASGI middleware and :func:`stage`), each model deployment a
:class:`ModelMonitor` (batch sizes formed by ``@serve.batch``, images, drift against the
version's reference, output quality and anomalies; tagged with the model version). Both also
keep small in-process windows that ``GET /v1/monitor`` summarises without Prometheus.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

import numpy as np

from montage.core.serve_sections import MonitoringConfig
from montage.platform.features import alpha_features, colour_change, input_features
from montage.serve.drift import DriftDetector

log = logging.getLogger("montage.serve")

LATENCY_MS = [1, 2.5, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000]
PIXELS = [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192]
BATCH = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
QUALITY = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 4]
STAGES = ("decode", "segment", "paste", "harmonize", "encode", "pix2pix")


_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "montage_pending", default=None
)  # (stage, ms) | (w, h) of this request
_INGRESS: IngressMonitor | None = None  # the ingress replica's monitor (one per process), read by the middleware


def version_tag(user_config: dict[str, Any]) -> str:
    """The ``version`` tag of a model's series: ``v<N>`` for a registry version, else the file name of
    the checkpoint or ONNX file (its runtime added when not torch)."""
    from montage.core.sources import ModelSource

    source = ModelSource.parse(user_config.get("source", ""))
    revision, runtime = user_config.get("revision", ""), user_config.get("runtime") or "torch"
    tag = f"v{revision}" if source.in_registry and revision else source.file_name
    return tag if runtime == "torch" else f"{tag}-{runtime}"


class _Metrics:
    """Ray metric objects, created once per process on first use."""

    _made: _Metrics | None = None

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "montage_requests", description="HTTP requests by endpoint and status code", tag_keys=("endpoint", "status")
        )
        self.errors = Counter(
            "montage_errors",
            description="HTTP requests answered >= 400, by endpoint and status code",
            tag_keys=("endpoint", "status"),
        )
        self.latency = Histogram(
            "montage_request_latency_ms",
            description="end-to-end latency in the ingress (ms)",
            boundaries=LATENCY_MS,
            tag_keys=("endpoint",),
        )
        self.stage = Histogram(
            "montage_stage_latency_ms",
            description="latency of a pipeline stage (ms)",
            boundaries=LATENCY_MS,
            tag_keys=("endpoint", "stage"),
        )
        self.width = Histogram(
            "montage_input_width_px",
            description="width of decoded input images",
            boundaries=PIXELS,
            tag_keys=("endpoint",),
        )
        self.height = Histogram(
            "montage_input_height_px",
            description="height of decoded input images",
            boundaries=PIXELS,
            tag_keys=("endpoint",),
        )
        self.batch = Histogram(
            "montage_batch_size",
            description="batch sizes formed by @serve.batch",
            boundaries=BATCH,
            tag_keys=("model", "version", "arm"),
        )
        self.images = Counter(
            "montage_images", description="images run through a model", tag_keys=("model", "version", "arm")
        )
        self.forward = Histogram(
            "montage_model_batch_latency_ms",
            description="one batch through the model (ms)",
            boundaries=LATENCY_MS,
            tag_keys=("model", "version", "arm"),
        )
        self.drift = Gauge(
            "montage_drift_score",
            description="drift of a feature against the reference (psi or ks)",
            tag_keys=("model", "version", "arm", "feature", "method"),
        )
        self.drifted = Gauge(
            "montage_drifted",
            description="1 when the feature is drifted (PSI and KS past their thresholds)",
            tag_keys=("model", "version", "arm", "feature"),
        )
        self.quality = Histogram(
            "montage_output_quality",
            description="no-reference output quality per request",
            boundaries=QUALITY,
            tag_keys=("model", "version", "arm", "metric"),
        )
        self.anomalies = Counter(
            "montage_anomalies",
            description="requests whose output quality lies outside the reference's range",
            tag_keys=("model", "version", "arm", "metric"),
        )

    @classmethod
    def get(cls) -> _Metrics:
        if cls._made is None:
            cls._made = cls()
        return cls._made


def _percentiles(values: Any) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "count": 0}
    p50, p95, p99 = np.percentile(np.fromiter(values, np.float64), [50, 95, 99])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2), "count": len(values)}


class IngressMonitor:
    """Requests and stages as seen by the ingress."""

    def __init__(self, cfg: MonitoringConfig | dict[str, Any] | None = None) -> None:
        self.cfg = cfg if isinstance(cfg, MonitoringConfig) else MonitoringConfig(**(cfg or {}))
        self.enabled = self.cfg.enabled
        self.m = _Metrics.get() if self.enabled else None
        self.started = time.time()
        self.requests: dict[str, deque[tuple[float, int, float]]] = {}
        self.stages: dict[tuple[str, str], deque[float]] = {}

    def install(self) -> None:
        """Make this the process's monitor (what the middleware and :func:`stage` record into)."""
        global _INGRESS
        _INGRESS = self if self.enabled else None

    def record_request(self, endpoint: str, status: int, ms: float, pending: list[tuple[Any, float]]) -> None:
        """One finished request and what it recorded on the way: ``(stage name, ms)`` of the stages
        it passed and ``(width, height)`` of the images it decoded."""
        tags = {"endpoint": endpoint, "status": str(status)}
        self.m.requests.inc(tags=tags)
        if status >= 400:
            self.m.errors.inc(tags=tags)
        ep = {"endpoint": endpoint}
        self.m.latency.observe(ms, tags=ep)
        for key, value in pending:
            if isinstance(key, str):
                self.record_stage(endpoint, key, value)
            else:
                self.m.width.observe(key, tags=ep)
                self.m.height.observe(value, tags=ep)
        q = self.requests.get(endpoint)
        if q is None:
            q = self.requests[endpoint] = deque(maxlen=self.cfg.window)
        q.append((time.time(), status, ms))

    def record_stage(self, endpoint: str, name: str, ms: float) -> None:
        self.m.stage.observe(ms, tags={"endpoint": endpoint, "stage": name})
        q = self.stages.get((endpoint, name))
        if q is None:
            q = self.stages[(endpoint, name)] = deque(maxlen=self.cfg.window)
        q.append(ms)

    def summary(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        for ep, q in sorted(self.requests.items()):
            items = list(q)
            recent = [t for t, _, _ in items if t >= now - 60]
            span = max(1e-3, min(60.0, now - self.started))
            errors: dict[str, int] = {}
            for _, status, _ in items:
                if status >= 400:
                    errors[str(status)] = errors.get(str(status), 0) + 1
            out[ep] = {
                "requests": len(items),
                "requests_per_s": round(len(recent) / span, 3),
                "error_rate": round(sum(errors.values()) / len(items), 4) if items else 0.0,
                "errors": errors,
                "latency_ms": _percentiles([ms for _, _, ms in items]),
                "stages": {s: _percentiles(list(v)) for (e, s), v in self.stages.items() if e == ep},
            }
        return out


class stage:  # noqa: N801 - used as ``with stage("decode"):``
    """Time a stage of the current request (no-op when monitoring is off or outside a request).
    Only a stage that completes is recorded: its histogram counts the requests that passed it."""

    __slots__ = ("name", "t0")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> stage:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pending = _PENDING.get()
        if pending is not None and exc_type is None:
            pending.append((self.name, (time.perf_counter() - self.t0) * 1000))


def record_input(img: np.ndarray) -> None:
    """Width and height of a decoded input, by endpoint."""
    pending = _PENDING.get()
    if pending is not None:
        pending.append((int(img.shape[1]), float(img.shape[0])))


class RequestMetrics:
    """ASGI middleware: requests by endpoint (the matched route's path; no route: ``other``) and
    status, errors, end-to-end latency. Sits inside FastAPI's error handling, so 4xx answers from
    exception handlers and validation are counted with their codes; an unhandled exception is a 500."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        mon = _INGRESS
        if mon is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pending: list[tuple[Any, float]] = []
        token = _PENDING.set(pending)
        status = 500
        t0 = time.perf_counter()

        async def _send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            _PENDING.reset(token)
            route = scope.get("route")  # set by FastAPI's router: the route's path template, not the raw path
            endpoint = getattr(route, "path", None) or "other"
            mon.record_request(endpoint, status, (time.perf_counter() - t0) * 1000, pending)


class ModelMonitor:
    """What a model deployment records: batches, images, drift and output quality, all tagged
    with the model and its version."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.cfg = MonitoringConfig(enabled=False)
        self.m: _Metrics | None = None
        self.tags = {"model": task, "version": "", "arm": "champion"}
        self.quality_values: dict[str, deque[float]] = {}  # per request, for comparing arms
        self.drift: DriftDetector | None = None
        self.reference_state = "none"  # none | pending | stored | computed | unavailable
        self.batches: deque[int] = deque(maxlen=500)
        self.forward_ms: deque[float] = deque(maxlen=500)
        self.recent: deque[tuple[float, int]] = deque(maxlen=5000)  # (time, batch size) for images/s
        self.started = time.time()
        self.anomalies: dict[str, int] = {}
        self.images = 0
        self._lock = threading.Lock()
        self._failed: set[str] = set()

    def configure(self, cfg: dict[str, Any] | None, version: str, checkpoint: str, arm: str = "champion") -> None:
        """(Re)start for a newly loaded model: its version and arm tags and its drift reference (the
        stored one, else computed from the checkpoint's data in a background thread)."""
        self.cfg = MonitoringConfig(**(cfg or {}))
        self.m = _Metrics.get() if self.cfg.enabled else None
        self.tags = {"model": self.task, "version": version, "arm": arm}
        self.quality_values = {}
        self.batches.clear()
        self.forward_ms.clear()
        self.recent.clear()
        self.started = time.time()
        self.anomalies, self.images, self.drift = {}, 0, None
        if not self.cfg.enabled:
            self.reference_state = "off"
            return
        from montage.tracking.drift import DRIFT_TASKS, find_reference

        if self.task not in DRIFT_TASKS:
            self.reference_state = "none"
            return
        ref = find_reference(checkpoint)
        if ref is not None:
            self._set_reference(ref, "stored")
            return
        self.reference_state = "pending"
        threading.Thread(
            target=self._compute_reference, args=(checkpoint, version), daemon=True, name="drift-reference"
        ).start()

    def _compute_reference(self, checkpoint: str, version: str) -> None:
        from montage.tracking.drift import load_or_compute_reference

        ref = load_or_compute_reference(checkpoint, self.task, self.cfg.reference_samples)
        if self.tags["version"] != version:  # a newer model was loaded meanwhile
            return
        if ref is None:
            self.reference_state = "unavailable"
        else:
            self._set_reference(ref, "computed")

    def _set_reference(self, ref: dict[str, Any], state: str) -> None:
        c = self.cfg
        with self._lock:
            self.drift = DriftDetector(
                ref,
                c.window,
                c.min_samples,
                c.psi_threshold,
                c.ks_pvalue,
                c.check_every,
                label=f"{self.task} {self.tags['version']}",
            )
            self.reference_state = state

    def record_batch(self, size: int, ms: float) -> None:
        if self.m is None:
            return
        self.m.batch.observe(size, tags=self.tags)
        self.m.images.inc(size, tags=self.tags)
        self.m.forward.observe(ms, tags=self.tags)
        self.batches.append(size)
        self.forward_ms.append(ms)
        self.recent.append((time.time(), size))
        self.images += size

    def observe_segmentation(self, images: list[np.ndarray], alphas: list[np.ndarray], t0: float) -> None:
        if self.m is None:
            return
        self.record_batch(len(images), (time.perf_counter() - t0) * 1000)
        with self._guard():
            for img, alpha in zip(images, alphas):
                self.record(input_features(img), alpha_features(alpha))

    def observe_harmonization(
        self, items: list[tuple[np.ndarray, np.ndarray, float]], results: list[np.ndarray], t0: float
    ) -> None:
        if self.m is None:
            return
        self.record_batch(len(items), (time.perf_counter() - t0) * 1000)
        with self._guard():
            for (comp, mask, _), out in zip(items, results):
                self.record(input_features(comp), colour_change(comp, out, mask))

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Monitoring never fails a request: a problem is logged (once per kind) and skipped."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            kind = type(exc).__name__
            if kind not in self._failed:
                self._failed.add(kind)
                log.warning("%s monitoring skipped a batch: %r", self.task, exc)

    def record(self, inputs: dict[str, float], outputs: dict[str, float]) -> None:
        """One request's input statistics and output quality (see montage.platform.features)."""
        if self.m is None:
            return
        drift = self.drift
        for name, value in outputs.items():
            self.m.quality.observe(value, tags={**self.tags, "metric": name})
            q = self.quality_values.get(name)
            if q is None:
                q = self.quality_values[name] = deque(maxlen=self.cfg.window)
            q.append(float(value))
            if drift is not None and drift.out_of_range(name, value):
                self.anomalies[name] = self.anomalies.get(name, 0) + 1
                self.m.anomalies.inc(tags={**self.tags, "metric": name})
        if drift is None:
            return
        with self._lock:
            if not drift.add({**inputs, **outputs}):
                return
            for feature, s in drift.state.items():
                tags = {**self.tags, "feature": feature}
                self.m.drift.set(s.psi, tags={**tags, "method": "psi"})
                self.m.drift.set(s.ks, tags={**tags, "method": "ks"})
                self.m.drifted.set(1.0 if s.drifted else 0.0, tags=tags)

    def quality_samples(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.quality_values.items()}

    def summary(self) -> dict[str, Any]:
        b, now = list(self.batches), time.time()
        last_minute = sum(n for t, n in list(self.recent) if t >= now - 60)
        out = {
            "version": self.tags["version"],
            "arm": self.tags["arm"],
            "enabled": self.cfg.enabled,
            "images": self.images,
            "images_per_s": round(last_minute / max(1e-3, min(60.0, now - self.started)), 3),
            "batch_size": {
                "mean": round(float(np.mean(b)), 2) if b else 0.0,
                "max": max(b, default=0),
                "batches": len(b),
            },
            "batch_ms": _percentiles(
                list(self.forward_ms)
            ),  # the model's own time per batch (the rest of a stage is the hop)
            "reference": self.reference_state,
            "anomalies": dict(self.anomalies),
        }
        if self.drift is not None:
            with self._lock:
                out["drift"] = self.drift.summary()
        return out


async def gather_summary(ingress: IngressMonitor | None, handles: dict[str, Any]) -> dict[str, Any]:
    """The ``GET /v1/monitor`` document: the ingress's windows and each model deployment's."""
    models = {}
    for task, handle in handles.items():
        if handle is not None:
            models[task] = await handle.monitor_summary.remote()
    return {
        "time": time.time(),
        "enabled": ingress is not None and ingress.enabled,
        "window": ingress.cfg.window if ingress is not None else 0,
        "endpoints": ingress.summary() if ingress is not None and ingress.enabled else {},
        "models": models,
    }
