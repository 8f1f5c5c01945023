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
from montage.serve.deployments import Harmonizer, Pix2Pix, Segmenter
from montage.serve.imaging import Limits, Placement, RequestError, decode_upload, mask_from_upload, paste, refine_alpha

log = logging.getLogger("montage.serve")


@dataclass
class ModelServeConfig:
    source: str = ""  # models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint path
    runtime: str = "torch"  # torch | onnx (a registered ONNX variant from `montage export`, run by ONNX Runtime)
    enabled: bool = True
    num_replicas: int = 1
    num_cpus: float = 0.25  # small by default: ingress + three models fit a 2-core laptop
    num_gpus: float = 0.0  # fractional GPUs allowed
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01


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
    name: str = "montage"


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    tree = to_dict(ServeConfig())
    if path:
        tree = merge(tree, read_yaml(path))
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    return from_dict(ServeConfig, tree)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>montage</title>
<style>body{font-family:sans-serif;margin:2em;max-width:60em}img{max-width:45%;margin:.5em;border:1px solid #ccc}</style></head>
<body><h1>montage: segment → composite → harmonize</h1>
<form id="f"><p>Person photo <input type="file" name="person" accept="image/*" required></p>
<p>Background <input type="file" name="background" accept="image/*" required></p>
<p>x <input name="x" value="0.5" size="4"> y <input name="y" value="0.6" size="4"> scale <input name="scale" value="0.7" size="4">
<button>Composite</button></p></form><div id="out"></div>
<script>
document.getElementById('f').onsubmit = async (e) => {
  e.preventDefault();
  const out = document.getElementById('out'); out.textContent = 'working…';
  const r = await fetch('/v1/composite', {method: 'POST', body: new FormData(e.target)});
  if (!r.ok) { out.textContent = 'error: ' + (await r.json()).detail; return; }
  const img = document.createElement('img'); img.src = URL.createObjectURL(await r.blob());
  out.replaceChildren(img);
};
</script></body></html>"""

api = FastAPI(title="montage", description="Segmentation, compositing, harmonization and pix2pix over HTTP.")


@api.exception_handler(RequestError)
async def _bad_request(request: Request, exc: RequestError) -> JSONResponse:
    """Every bad input is a 4xx JSON answer naming the problem."""
    return JSONResponse(status_code=exc.status, content={"detail": str(exc)})


def png(arr: np.ndarray) -> Response:
    return Response(content=encode_png(arr), media_type="image/png")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, segmenter: Any, harmonizer: Any, pix2pix: Any, limits: dict[str, int]) -> None:
        self.segmenter, self.harmonizer, self.pix2pix = segmenter, harmonizer, pix2pix
        self.limits = Limits(**limits)

    async def _read(self, upload: UploadFile | None, name: str, mode: str = "rgb") -> np.ndarray:
        data = await upload.read(self.limits.max_bytes + 1) if upload is not None else None
        return decode_upload(data, name, self.limits, mode)

    def _need(self, handle: Any, task: str) -> Any:
        if handle is None:
            raise RequestError(f"the {task} model is not enabled on this server", 503)
        return handle

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        models = {}
        for task, handle in (("segmentation", self.segmenter), ("harmonization", self.harmonizer), ("pix2pix", self.pix2pix)):
            if handle is not None:
                models[task] = await handle.version.remote()
        return {"status": "ok", "models": models}

    @api.get("/", response_class=HTMLResponse)
    async def index(self) -> str:
        return PAGE

    @api.post("/v1/segment")
    async def segment(self, image: UploadFile | None = File(None), threshold: float | None = Query(None), refine: bool = Query(False)) -> Response:
        img = await self._read(image, "image")
        alpha = await self._need(self.segmenter, "segmentation").remote(img)
        alpha = refine_alpha(alpha, img, threshold, refine)
        return png(np.dstack([img, (alpha * 255).round().astype(np.uint8)]))

    @api.post("/v1/harmonize")
    async def harmonize(self, composite: UploadFile | None = File(None), mask: UploadFile | None = File(None), blend: float = Form(1.0)) -> Response:
        comp = await self._read(composite, "composite")
        m = mask_from_upload(await self._read(mask, "mask", mode="unchanged"))
        if m.shape != comp.shape[:2]:
            raise RequestError(f"mask is {m.shape[1]}x{m.shape[0]} but composite is {comp.shape[1]}x{comp.shape[0]}")
        if not 0 <= blend <= 1:
            raise RequestError(f"blend must be in [0, 1], got {blend}")
        return png(await self._need(self.harmonizer, "harmonization").remote(comp, m, blend))

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
    ) -> Response:
        if return_ not in ("image", "layers"):
            raise RequestError(f"return must be image or layers, got {return_!r}")
        where = Placement(x, y, scale)
        if not 0 <= blend <= 1:
            raise RequestError(f"blend must be in [0, 1], got {blend}")
        p = await self._read(person, "person")
        bg = await self._read(background, "background")
        alpha = await self._need(self.segmenter, "segmentation").remote(p)
        raw, mask = paste(p, alpha, bg, where)
        result = await self._need(self.harmonizer, "harmonization").remote(raw, mask, blend)
        if return_ == "image":
            return png(result)
        b64 = lambda a: base64.b64encode(encode_png(a)).decode()  # noqa: E731
        return JSONResponse({"image": b64(result), "alpha": b64((alpha * 255).round().astype(np.uint8)), "composite": b64(raw), "mask": b64(mask), "encoding": "base64 PNG"})

    @api.post("/v1/pix2pix")
    async def pix2pix(self, landmarks: str | None = Form(None), heatmap: UploadFile | None = File(None)) -> Response:
        if (landmarks is None) == (heatmap is None):
            raise RequestError("send exactly one of 'landmarks' (JSON: 48 [x, y] pairs) or 'heatmap' (an image)", 422)
        handle = self._need(self.pix2pix, "pix2pix")
        if heatmap is not None:
            return png(await handle.remote(await self._read(heatmap, "heatmap", mode="gray")))
        try:
            pts = json.loads(landmarks)
        except json.JSONDecodeError as exc:
            raise RequestError(f"'landmarks' is not JSON: {exc}") from exc
        pts = pts.get("labels") if isinstance(pts, dict) else pts
        arr = np.asarray(pts, dtype=object)
        if arr.ndim != 2 or arr.shape != (48, 2):
            raise RequestError(f"'landmarks' must be 48 [x, y] pairs, got shape {arr.shape}")
        try:
            return png(await handle.remote(arr.astype(np.float64)))
        except ValueError as exc:
            raise RequestError(str(exc)) from exc


def _model(cls: Any, cfg: ModelServeConfig, task: str, tracking_uri: str) -> Any:
    if not cfg.enabled:
        return None
    if cfg.runtime not in ("torch", "onnx"):
        raise ValueError(f"{task}.runtime: unknown '{cfg.runtime}'; valid: torch, onnx")
    from montage.tracking.registry import CHAMPION, model_name, resolve_version

    source = cfg.source or f"models:/{model_name(task)}@{CHAMPION}"
    revision = ""
    if source.startswith("models:/"):  # pin the alias's current version so a reload after a promotion reconfigures
        revision = resolve_version(source, tracking_uri)
    elif Path(source).exists():
        revision = str(Path(source).stat().st_mtime_ns)
    return cls.options(
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        user_config={
            "source": source, "runtime": cfg.runtime, "revision": revision, "tracking_uri": tracking_uri,
            "max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        },
    ).bind()


def build_app(cfg: ServeConfig) -> Any:
    from montage.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri)
    return Ingress.options(num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.ingress_cpus}).bind(
        _model(Segmenter, cfg.segmentation, "segmentation", uri),
        _model(Harmonizer, cfg.harmonization, "harmonization", uri),
        _model(Pix2Pix, cfg.pix2pix, "pix2pix", uri),
        {"max_side": cfg.max_side, "max_bytes": cfg.max_bytes},
    )


def run(cfg: ServeConfig, blocking: bool = False) -> Any:
    """Start (or update in place: replicas reconfigure to new sources) the application."""
    from montage.launch.session import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(cfg), name=cfg.name, route_prefix="/", blocking=blocking)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run montage.serve.app:app_builder config=serve.yaml`` and Serve config files."""
    return build_app(load_serve_config(args.get("config"), [f"{k}={v}" for k, v in args.items() if k != "config"]))
