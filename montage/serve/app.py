"""The Serve application: FastAPI ingress composing Segmenter → paste → Harmonizer (+ Pix2Pix).

``montage serve [--config serve.yaml] [key=value ...]`` or ``serve run montage.serve.app:app``.
"""

# no `from __future__ import annotations` here: FastAPI resolves the endpoint annotations at runtime

import base64
import json
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from montage.core.config import to_dict
from montage.core.serve_sections import (  # noqa: F401  (re-exported: the CLI, demo, benches and tests load from here)
    AutoscalingServeConfig,
    ModelServeConfig,
    ServeConfig,
    load_serve_config,
)
from montage.platform.imaging import encode_png
from montage.serve import access
from montage.serve.deployments import LocalModel, unit_alpha
from montage.serve.graph import (  # noqa: F401
    ReloadError,
    _check_sources,
    _overload,
    check_reload,
    code_version,
    model_graph,
    pinned,
)
from montage.serve.imaging import Limits, Placement, RequestError, decode_upload, mask_from_upload, paste, refine_alpha
from montage.serve.monitoring import (
    IngressMonitor,
    RequestMetrics,
    gather_summary,
    record_input,
    stage,
)
from montage.serve.page import page_html
from montage.serve.rollout import Arms, VersionHeaders, answered

log = logging.getLogger("montage.serve")


api = FastAPI(title="montage", description="Segmentation, compositing, harmonization and pix2pix over HTTP.")
access.install(api)  # API keys on /v1/*, CORS allow-list, backpressure → 503 + Retry-After (montage.serve.access)
api.add_middleware(RequestMetrics)  # requests, errors by status and latency per endpoint (montage.serve.monitoring)
api.add_middleware(VersionHeaders)  # X-Montage-Model-Version per model stage; the caller key (montage.serve.rollout)


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
        challengers: dict[str, Any] | None = None,
    ) -> None:
        # fused: the models run in this replica (LocalModel), called like deployment handles
        local = lambda h: LocalModel.from_spec(h) if isinstance(h, dict) else h  # noqa: E731
        self.segmenter, self.harmonizer, self.pix2pix = (local(h) for h in (segmenter, harmonizer, pix2pix))
        chall = {t: local(h) for t, h in (challengers or {}).items()}
        self.arms = {
            t: Arms(t, h, chall.get(t))
            for t, h in (
                ("segmentation", self.segmenter),
                ("harmonization", self.harmonizer),
                ("pix2pix", self.pix2pix),
            )
            if h is not None
        }
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

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"rollout": {task: {"config", "salt", "source", "version", "tracking_uri"}}}``: the rollout
        settings, changed in place (no restart) by a reload."""
        from montage.serve.rollout import registry_step

        for task, spec in (user_config.get("rollout") or {}).items():
            if task in self.arms:
                arms = self.arms[task]
                arms.configure(spec.get("config"), spec.get("salt", ""))
                arms.on_decision = registry_step(spec)

    async def _run(self, task: str, *args: Any) -> Any:
        arms = self.arms.get(task)
        if arms is None:
            raise RequestError(f"the {task} model is not enabled on this server", 503)
        return await arms.call(*args)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        models, challengers, errors = {}, {}, {}
        for task, arms in self.arms.items():
            for arm, handle in (("champion", arms.champion), ("challenger", arms.challenger)):
                if handle is None:
                    continue
                st = await handle.status.remote()
                (models if arm == "champion" else challengers)[task] = st["label"]
                if st["reload_error"]:
                    errors[task if arm == "champion" else f"{task} (challenger)"] = st["reload_error"]
        doc: dict[str, Any] = {"status": "degraded" if errors else "ok", "models": models}
        if challengers:
            doc["challengers"] = challengers
        if errors:  # still serving the previous version: say which reload failed and why
            doc["reload_errors"] = errors
        return doc

    @api.get("/v1/monitor")
    async def monitor(self) -> dict[str, Any]:
        """Latency per endpoint and stage (p50/p95/p99), requests/s, errors, drift, anomalies and
        model versions over this replica's windows (``montage monitor --url``)."""
        doc = await gather_summary(
            self.monitor, {"segmentation": self.segmenter, "harmonization": self.harmonizer, "pix2pix": self.pix2pix}
        )
        doc["rollout"] = {}
        for task, arms in self.arms.items():
            if arms.challenger is None:
                continue
            quality = {
                "champion": await arms.champion.quality_samples.remote(),
                "challenger": await arms.challenger.quality_samples.remote(),
            }
            side = arms.compare(quality)
            champion, challenger = doc["models"].get(task, {}), await arms.challenger.monitor_summary.remote()
            side["drift"] = {"champion": champion.get("drift"), "challenger": challenger.get("drift")}
            # whether each arm's drift reference is ready (a checkpoint computes its own at start: minutes of CPU)
            side["reference"] = {"champion": champion.get("reference"), "challenger": challenger.get("reference")}
            arms.judge(side)
            doc["rollout"][task] = side
        return doc

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
            alpha = unit_alpha(await self._run("segmentation", img, tta))
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
            out = await self._run("harmonization", comp, m, blend)
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
            alpha = unit_alpha(await self._run("segmentation", p, tta))
        with stage("paste"):
            raw, mask = paste(p, alpha, bg, where)
        with stage("harmonize"):
            result = await self._run("harmonization", raw, mask, blend)
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
                "versions": answered(),
            }
        )

    @api.post("/v1/pix2pix")
    async def pix2pix(self, landmarks: str | None = Form(None), heatmap: UploadFile | None = File(None)) -> Response:
        if (landmarks is None) == (heatmap is None):
            raise RequestError("send exactly one of 'landmarks' (JSON: 48 [x, y] pairs) or 'heatmap' (an image)", 422)
        if "pix2pix" not in self.arms:
            raise RequestError("the pix2pix model is not enabled on this server", 503)
        if heatmap is not None:
            heat = await self._read(heatmap, "heatmap", mode="gray")
            with stage("pix2pix"):
                out = await self._run("pix2pix", heat)
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
                out = await self._run("pix2pix", arr)
            return png(out)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc


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
    bound, challengers, rollout = model_graph(cfg, uri)
    limits = {"max_side": cfg.max_side, "max_bytes": cfg.max_bytes}
    shape = [(t, b if isinstance(b, dict) or b is None else "graph") for t, b in bound.items()]
    shape += [(t, c if isinstance(c, dict) else "graph") for t, c in challengers.items()]
    ingress = Ingress.options(
        num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
        user_config={"rollout": rollout},
        **overload,
    )
    # the same arguments: a reload reconfigures the ingress in place (rollout settings); other ones restart it
    return pinned(ingress, code_version(shape, limits, to_dict(cfg.monitoring), settings)).bind(
        bound["segmentation"],
        bound["harmonization"],
        bound["pix2pix"],
        limits,
        to_dict(cfg.monitoring),
        access_settings=settings,
        challengers=challengers,
    )


def run(cfg: ServeConfig, blocking: bool = False, insecure: bool = False) -> Any:
    """Start (or update in place: replicas reconfigure to new sources) the application.

    Refuses a non-loopback ``host`` without API keys unless ``insecure``."""
    from montage.launch.session import ensure_ray

    access.check_bind(cfg.host, access.resolve_settings(cfg.auth, cfg.cors), insecure)
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    if cfg.fused:  # the models load in new ingress replicas: refuse a model that does not load before deploying
        _check_sources(cfg)
    if blocking:
        return serve.run(build_app(cfg), name=cfg.name, route_prefix="/", blocking=True)
    handle = serve.run(build_app(cfg), name=cfg.name, route_prefix="/", blocking=False)
    check_reload(cfg)
    return handle


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run montage.serve.app:app_builder config=serve.yaml`` and Serve config files."""
    return build_app(load_serve_config(args.get("config"), [f"{k}={v}" for k, v in args.items() if k != "config"]))
