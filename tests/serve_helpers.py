"""Helpers for the Serve tests that start their own application (hardening, the page)."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import cv2
import numpy as np
import requests
from conftest import _tiny


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(arr: np.ndarray) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR if arr.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    return cv2.imencode(".png", arr)[1].tobytes()


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def pil_bytes(arr: np.ndarray, fmt: str, mode: str | None = None, **kwargs) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def checkpoints(tmp: Path, tasks: tuple[str, ...]) -> dict[str, str]:
    """One-step tiny models (what matters here is the HTTP layer, not the weights)."""
    from montage.launch.local import fit_local

    return {
        t: fit_local(_tiny(t, tmp, ["tracking.enabled=false", "train.max_steps=1", f"run.name={t}"])).best_checkpoint
        for t in tasks
    }


def start(overrides: list[str]) -> None:
    from montage.serve.app import load_serve_config, run

    run(load_serve_config(None, overrides))


def stop_serve(timeout: float = 120) -> None:
    """``serve.shutdown()``, then wait until Serve's controller and proxies are gone (killed if they outlive
    ``timeout``). ``serve.shutdown()`` gives up waiting after 30 s and returns with the controller still
    shutting down; the next module's start then joins that controller, keeps its HTTP port ("the new HTTP
    config is ignored") and its requests meet a closed port."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    serve.shutdown()

    def left() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == SERVE_NAMESPACE]

    for kill in (False, True):
        end = time.monotonic() + timeout
        while names := left():
            if time.monotonic() > end:
                break
            time.sleep(0.25)
        else:
            return
        if kill:
            raise TimeoutError(f"Serve's actors {names} outlived serve.shutdown() and ray.kill by {timeout} s")
        for name in names:
            try:
                ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
            except ValueError:  # it went meanwhile
                pass


def wait_healthy(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout} s")
        time.sleep(0.2)
