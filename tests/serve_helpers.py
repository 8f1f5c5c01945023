"""Helpers for the Serve tests: the application test_serve and test_serve_hardening share, images,
start / stop."""

from __future__ import annotations

import io
import time
from pathlib import Path

import cv2
import numpy as np
import requests
from cluster_helpers import free_port, wait_until  # noqa: F401  (free_port: the Serve tests import it from here)
from conftest import _tiny


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

    try:
        wait_until(lambda: not left(), timeout, "Serve's actors to go after serve.shutdown()")
    except TimeoutError:
        for name in left():
            try:
                ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
            except ValueError:  # it went meanwhile
                pass
        wait_until(lambda: not left(), timeout, f"Serve's actors {left()} to go after ray.kill")


def delete_app(name: str = "montage") -> None:
    """Delete one application from the run's Serve instance (``serve_port``): its replicas are gone and its
    route is free when this returns; Serve's controller and proxy stay for the next module's application."""
    from ray import serve

    serve.delete(name)


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every sample on Ray's metrics port (what Prometheus scrapes)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


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


class Load:
    """``with Load(url) as load:`` — ``clients`` threads post a small /v1/segment each, back to back, until the
    block ends; ``load.calls`` holds ``(started, status, X-Montage-Model-Version or "")`` per request."""

    def __init__(self, url: str, clients: int = 2) -> None:
        import threading

        self.url, self.calls = url, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, seed: int) -> None:
        body = png(img(24, 24, seed))
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                r = requests.post(f"{self.url}/v1/segment", files={"image": body}, timeout=60)
                self.calls.append((started, r.status_code, r.headers.get("x-montage-model-version", "")))
            except requests.RequestException as exc:  # a refused connection is a failed request too
                self.calls.append((started, 0, repr(exc)))

    def answered_since(self, t: float) -> list[str]:
        """The version headers of the requests that started after ``t`` (monotonic clock)."""
        return [v for started, _, v in list(self.calls) if started > t]

    def wait_for(self, n: int, since: float = 0.0, timeout: float = 60) -> None:
        wait_until(lambda: len(self.answered_since(since)) >= n, timeout, f"{n} answers under load")

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


ALLOWED_ORIGIN = "http://allowed.example"
MAX_BYTES = 300_000


class SharedApp:
    """The Serve application of test_serve and test_serve_hardening (one start-up for both modules):
    tiny checkpoints of the three tasks, pix2pix on, API keys on (a bearer key in ``session``), a CORS
    allow-list and small size limits. A test that reconfigures it restores ``overrides`` before it ends
    (test_serve_hardening's last two, the overload and fused-mode tests, excepted)."""

    def __init__(self, tmp: Path, port: int) -> None:
        import requests

        from montage.serve import access

        self.tmp = tmp
        self.ckpts = checkpoints(tmp, ("segmentation", "harmonization", "pix2pix"))
        self.key, line = access.new_key()
        keys = tmp / "serve.keys"
        keys.write_text(line + "\n")
        self.url = f"http://127.0.0.1:{port}"
        self.overrides = [
            f"port={port}",
            "max_side=1024",
            f"max_bytes={MAX_BYTES}",
            "pix2pix.enabled=true",
            f"auth.api_keys_file={keys}",
            f"cors.allow_origins=[{ALLOWED_ORIGIN}]",
        ] + [f"{t}.source={p}" for t, p in self.ckpts.items()]
        start(self.overrides)
        self.session = requests.Session()
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64))
        self.session.headers["Authorization"] = f"Bearer {self.key}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.session.close()
            delete_app()
            self.running = False
