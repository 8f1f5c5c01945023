"""The Serve application: FastAPI ingress composing Segmenter → paste → Harmonizer (+ Pix2Pix).

``montage serve [--config serve.yaml] [key=value ...]`` or ``serve run montage.serve.app:app``.
"""

# no `from __future__ import annotations` here: FastAPI resolves the endpoint annotations at runtime

import base64
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from montage.core.config import from_dict, merge, parse_override, read_yaml, set_dotted, to_dict
from montage.platform.imaging import encode_png
from montage.serve import access
from montage.serve.access import AuthConfig, CorsConfig
from montage.serve.deployments import Harmonizer, LocalModel, Pix2Pix, Segmenter, unit_alpha
from montage.serve.imaging import Limits, Placement, RequestError, decode_upload, mask_from_upload, paste, refine_alpha
from montage.serve.monitoring import (
    IngressMonitor,
    MonitoringConfig,
    RequestMetrics,
    gather_summary,
    record_input,
    stage,
)
from montage.serve.page import page_html

log = logging.getLogger("montage.serve")


@dataclass
class ModelServeConfig:
    source: str = ""  # models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint path
    # torch | onnx | openvino (a registered ONNX variant from `montage export`, run by ONNX Runtime or OpenVINO)
    runtime: str = "torch"
    enabled: bool = True
    num_replicas: int = 1
    num_cpus: float = 0.25  # small by default: ingress + three models fit a 2-core laptop
    num_gpus: float = 0.0  # fractional GPUs allowed
    max_batch_size: int = 8
    # how long @serve.batch waits for more requests: a lone request waited the whole 10 ms at each model
    # before; under load a batch forms anyway from what queued during the previous forward (GPUs may want a few ms)
    batch_wait_timeout_s: float = 0.0
    threads: int = 0  # torch intra-op threads in a replica; 0: what Ray sets from num_cpus (1 for a fractional CPU)
    max_ongoing_requests: int = 16  # per replica; keep >= max_batch_size so batches can fill
    max_queued_requests: int = (
        64  # per caller (the ingress); past it the ingress answers 503 + Retry-After; -1: unbounded
    )


@dataclass
class ServeConfig:
    segmentation: ModelServeConfig = field(default_factory=ModelServeConfig)
    harmonization: ModelServeConfig = field(default_factory=ModelServeConfig)
    pix2pix: ModelServeConfig = field(default_factory=lambda: ModelServeConfig(enabled=False))
    tracking_uri: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    max_side: int = 4096
    max_bytes: int = 20 * 1024 * 1024
    ingress_cpus: float = 0.25
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = 32  # per ingress replica
    ingress_max_queued_requests: int = (
        128  # at the HTTP proxy; past it the proxy answers 503 (plain text) + Retry-After; -1: unbounded
    )
    retry_after_s: float = 1.0  # the Retry-After of every backpressure 503
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    name: str = "montage"
    # run the models inside the ingress replica: no deployment-handle hop (lowest latency at low load),
    # but no model replicas of their own (they scale and queue with the ingress)
    fused: bool = False
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    tree = to_dict(ServeConfig())
    if path:
        tree = merge(tree, read_yaml(path))
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    return from_dict(ServeConfig, tree)


api = FastAPI(title="montage", description="Segmentation, compositing, harmonization and pix2pix over HTTP.")
access.install(api)  # API keys on /v1/*, CORS allow-list, backpressure → 503 + Retry-After (montage.serve.access)
api.add_middleware(RequestMetrics)  # requests, errors by status and latency per endpoint (montage.serve.monitoring)


@api.exception_handler(RequestError)
async def _bad_request(request: Request, exc: RequestError) -> JSONResponse:
    """Every bad input is a 4xx JSON answer naming the problem."""
    return JSONResponse(status_code=exc.status, content={"detail": str(exc)})


def png(arr: np.ndarray) -> Response:
    with stage("encode"):
        return Response(content=encode_png(arr), media_type="image/png")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        segmenter: Any,
        harmonizer: Any,
        pix2pix: Any,
        limits: dict[str, int],
        monitoring: dict[str, Any] | None = None,
        access_settings: access.AccessSettings | None = None,
    ) -> None:
        # fused: the models run in this replica (LocalModel), called like deployment handles
        self.segmenter, self.harmonizer, self.pix2pix = (
            LocalModel.from_spec(h) if isinstance(h, dict) else h for h in (segmenter, harmonizer, pix2pix)
        )
        access.configure(access_settings or access.AccessSettings())
        self.limits = Limits(**limits)
        self.monitor = IngressMonitor(monitoring)
        self.monitor.install()

    async def _read(self, upload: UploadFile | None, name: str, mode: str = "rgb") -> np.ndarray:
        data = await upload.read(self.limits.max_bytes + 1) if upload is not None else None
        with stage("decode"):
            img = decode_upload(data, name, self.limits, mode)
        record_input(img)
        return img

    def _need(self, handle: Any, task: str) -> Any:
        if handle is None:
            raise RequestError(f"the {task} model is not enabled on this server", 503)
        return handle

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        models = {}
        for task, handle in (
            ("segmentation", self.segmenter),
            ("harmonization", self.harmonizer),
            ("pix2pix", self.pix2pix),
        ):
            if handle is not None:
                models[task] = await handle.version.remote()
        return {"status": "ok", "models": models}

    @api.get("/v1/monitor")
    async def monitor(self) -> dict[str, Any]:
        """Latency per endpoint and stage (p50/p95/p99), requests/s, errors, drift, anomalies and
        model versions over this replica's windows (``montage monitor --url``)."""
        return await gather_summary(
            self.monitor, {"segmentation": self.segmenter, "harmonization": self.harmonizer, "pix2pix": self.pix2pix}
        )

    @api.get("/", response_class=HTMLResponse)
    async def index(self) -> str:
        return page_html(access.current().auth)

    @api.post("/v1/segment")
    async def segment(
        self,
        image: UploadFile | None = File(None),
        threshold: float | None = Query(None),
        refine: bool = Query(False),
        tta: bool = Query(False),
    ) -> Response:
        img = await self._read(image, "image")
        with stage("segment"):
            alpha = unit_alpha(await self._need(self.segmenter, "segmentation").remote(img, tta))
        alpha = refine_alpha(alpha, img, threshold, refine)
        return png(np.dstack([img, (alpha * 255).round().astype(np.uint8)]))

    @api.post("/v1/harmonize")
    async def harmonize(
        self, composite: UploadFile | None = File(None), mask: UploadFile | None = File(None), blend: float = Form(1.0)
    ) -> Response:
        comp = await self._read(composite, "composite")
        m = mask_from_upload(await self._read(mask, "mask", mode="unchanged"))
        if m.shape != comp.shape[:2]:
            raise RequestError(f"mask is {m.shape[1]}x{m.shape[0]} but composite is {comp.shape[1]}x{comp.shape[0]}")
        if not 0 <= blend <= 1:
            raise RequestError(f"blend must be in [0, 1], got {blend}")
        with stage("harmonize"):
            out = await self._need(self.harmonizer, "harmonization").remote(comp, m, blend)
        return png(out)

    @api.post("/v1/composite", response_model=None)
    async def composite(
        self,
        person: UploadFile | None = File(None),
        background: UploadFile | None = File(None),
        x: float = Form(0.5),
        y: float = Form(0.6),
        scale: float = Form(0.7),
        blend: float = Form(1.0),
        return_: str = Query("image", alias="return"),
        tta: bool = Query(False),
    ) -> Response:
        if return_ not in ("image", "layers"):
            raise RequestError(f"return must be image or layers, got {return_!r}")
        where = Placement(x, y, scale)
        if not 0 <= blend <= 1:
            raise RequestError(f"blend must be in [0, 1], got {blend}")
        p = await self._read(person, "person")
        bg = await self._read(background, "background")
        with stage("segment"):
            alpha = unit_alpha(await self._need(self.segmenter, "segmentation").remote(p, tta))
        with stage("paste"):
            raw, mask = paste(p, alpha, bg, where)
        with stage("harmonize"):
            result = await self._need(self.harmonizer, "harmonization").remote(raw, mask, blend)
        if return_ == "image":
            return png(result)
        b64 = lambda a: base64.b64encode(encode_png(a)).decode()  # noqa: E731
        return JSONResponse(
            {
                "image": b64(result),
                "alpha": b64((alpha * 255).round().astype(np.uint8)),
                "composite": b64(raw),
                "mask": b64(mask),
                "encoding": "base64 PNG",
            }
        )

    @api.post("/v1/pix2pix")
    async def pix2pix(self, landmarks: str | None = Form(None), heatmap: UploadFile | None = File(None)) -> Response:
        if (landmarks is None) == (heatmap is None):
            raise RequestError("send exactly one of 'landmarks' (JSON: 48 [x, y] pairs) or 'heatmap' (an image)", 422)
        handle = self._need(self.pix2pix, "pix2pix")
        if heatmap is not None:
            heat = await self._read(heatmap, "heatmap", mode="gray")
            with stage("pix2pix"):
                out = await handle.remote(heat)
            return png(out)
        try:
            pts = json.loads(landmarks)
        except json.JSONDecodeError as exc:
            raise RequestError(f"'landmarks' is not JSON: {exc}") from exc
        pts = pts.get("labels") if isinstance(pts, dict) else pts
        try:
            arr = np.asarray(pts, dtype=object)
        except ValueError as exc:  # ragged nesting numpy cannot hold
            raise RequestError(f"'landmarks' must be 48 [x, y] pairs: {exc}") from exc
        if arr.ndim != 2 or arr.shape != (48, 2):
            raise RequestError(f"'landmarks' must be 48 [x, y] pairs, got shape {arr.shape}")
        try:  # checked here, not in the batched replica, where one bad request would fail its whole batch
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"'landmarks' must be numbers: {exc}") from exc
        if not np.isfinite(arr).all():
            raise RequestError("'landmarks' contain NaN or infinity")
        try:
            with stage("pix2pix"):
                out = await handle.remote(arr)
            return png(out)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc


def _model(
    cls: Any,
    cfg: ModelServeConfig,
    task: str,
    tracking_uri: str,
    monitoring: MonitoringConfig | None = None,
    retry_after_s: float = 1.0,
    fused: bool = False,
) -> Any:
    """The bound deployment of a model, or (``fused``) what the ingress needs to run it itself."""
    if not cfg.enabled:
        return None
    if cfg.runtime not in ("torch", "onnx", "openvino"):
        raise ValueError(f"{task}.runtime: unknown '{cfg.runtime}'; valid: torch, onnx, openvino")
    from montage.tracking.registry import CHAMPION, model_name, resolve_version

    source = cfg.source or f"models:/{model_name(task)}@{CHAMPION}"
    revision = ""
    if source.startswith("models:/"):  # pin the alias's current version so a reload after a promotion reconfigures
        revision = resolve_version(source, tracking_uri)
    elif Path(source).exists():
        revision = str(Path(source).stat().st_mtime_ns)
    user_config = {
        "source": source,
        "runtime": cfg.runtime,
        "revision": revision,
        "tracking_uri": tracking_uri,
        "max_batch_size": cfg.max_batch_size,
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        "threads": cfg.threads,
        "monitoring": to_dict(monitoring or MonitoringConfig()),
    }
    if fused:
        return LocalModel.spec(cls, user_config)
    return cls.options(
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        **_overload(task, cfg.max_ongoing_requests, cfg.max_queued_requests, retry_after_s),
        user_config=user_config,
    ).bind()


def build_app(cfg: ServeConfig) -> Any:
    from montage.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri)
    # keys → hashes here, in the driver: the replicas never see a key, nor need the file or the variable
    settings = access.resolve_settings(
        cfg.auth, cfg.cors, cfg.retry_after_s, max_body_bytes=2 * cfg.max_bytes + 1024 * 1024
    )
    overload = _overload(
        "ingress", cfg.ingress_max_ongoing_requests, cfg.ingress_max_queued_requests, cfg.retry_after_s
    )
    return Ingress.options(
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.ingress_cpus}, **overload
    ).bind(
        _model(Segmenter, cfg.segmentation, "segmentation", uri, cfg.monitoring, cfg.retry_after_s, cfg.fused),
        _model(Harmonizer, cfg.harmonization, "harmonization", uri, cfg.monitoring, cfg.retry_after_s, cfg.fused),
        _model(Pix2Pix, cfg.pix2pix, "pix2pix", uri, cfg.monitoring, cfg.retry_after_s, cfg.fused),
        {"max_side": cfg.max_side, "max_bytes": cfg.max_bytes},
        to_dict(cfg.monitoring),
        access_settings=settings,
    )


def _overload(what: str, max_ongoing: int, max_queued: int, retry_after_s: float) -> dict[str, Any]:
    """Bounded queues: past ``max_queued`` waiting requests a caller gets 503 with Retry-After at once."""
    if max_ongoing < 1:
        raise ValueError(f"{what}: max_ongoing_requests must be >= 1, got {max_ongoing}")
    if max_queued < 1 and max_queued != -1:
        raise ValueError(f"{what}: max_queued_requests must be >= 1 or -1 (unbounded), got {max_queued}")
    if retry_after_s < 0:
        raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
    return {
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max_queued,
        "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
    }


def run(cfg: ServeConfig, blocking: bool = False, insecure: bool = False) -> Any:
    """Start (or update in place: replicas reconfigure to new sources) the application.

    Refuses a non-loopback ``host`` without API keys unless ``insecure``."""
    from montage.launch.session import ensure_ray

    access.check_bind(cfg.host, access.resolve_settings(cfg.auth, cfg.cors), insecure)
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(cfg), name=cfg.name, route_prefix="/", blocking=blocking)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run montage.serve.app:app_builder config=serve.yaml`` and Serve config files."""
    return build_app(load_serve_config(args.get("config"), [f"{k}={v}" for k, v in args.items() if k != "config"]))
