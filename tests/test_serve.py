"""The real Serve application on the test Ray, called over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests
from conftest import _tiny
from serve_helpers import decode as _decode
from serve_helpers import img as _img
from serve_helpers import png as _png
from stores import mlflow_store

# every call carries the shared application's API key (set by the fixture)
http = requests.Session()


@pytest.fixture(scope="module")
def server(serve_app):
    """The application test_serve_hardening also uses (``serve_app``: API keys on)."""
    http.headers["Authorization"] = f"Bearer {serve_app.key}"
    yield {"url": serve_app.url, "ckpts": serve_app.ckpts, "overrides": serve_app.overrides, "tmp": serve_app.tmp}
    http.close()


def test_endpoints_return_images_of_the_input_size(server) -> None:
    url = server["url"]
    health = http.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and set(health["models"]) == {"segmentation", "harmonization", "pix2pix"}
    page = http.get(url, timeout=30).text  # the page (tests/test_serve_hardening.py drives it in a browser)
    assert 'id="person"' in page

    r = http.post(f"{url}/v1/segment", files={"image": _png(_img(73, 121))}, params={"refine": "true"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert _decode(r.content).shape == (73, 121, 4)
    r = http.post(f"{url}/v1/segment", files={"image": _png(_img(50, 40))}, params={"threshold": 0.5}, timeout=60)
    assert set(np.unique(_decode(r.content)[..., 3])) <= {0, 255}

    comp = _img(90, 70, 1)
    mask = np.zeros((90, 70), np.uint8)
    mask[20:70, 10:50] = 255
    r = http.post(
        f"{url}/v1/harmonize", files={"composite": _png(comp), "mask": _png(mask)}, data={"blend": "0.8"}, timeout=60
    )
    assert r.status_code == 200
    out = cv2.cvtColor(_decode(r.content), cv2.COLOR_BGR2RGB)
    assert out.shape == comp.shape
    np.testing.assert_array_equal(out[mask == 0], comp[mask == 0])

    bg = _img(160, 240, 2)
    r = http.post(
        f"{url}/v1/composite",
        files={"person": _png(_img(100, 60, 3)), "background": _png(bg)},
        data={"x": "0.3", "y": "0.5", "scale": "0.5"},
        timeout=60,
    )
    assert r.status_code == 200
    res = cv2.cvtColor(_decode(r.content), cv2.COLOR_BGR2RGB)
    assert res.shape == bg.shape
    # the person is 80 px high, 48 px wide, centred at (72, 80): outside that box the background is untouched
    outside = np.ones(bg.shape[:2], bool)
    outside[40:120, 48:96] = False
    np.testing.assert_array_equal(res[outside], bg[outside])
    r = http.post(
        f"{url}/v1/composite",
        files={"person": _png(_img(100, 60, 3)), "background": _png(bg)},
        params={"return": "layers"},
        timeout=60,
    )
    layers = r.json()
    import base64

    assert {"image", "alpha", "composite", "mask"} <= set(layers)
    assert _decode(base64.b64decode(layers["alpha"])).shape == (100, 60)
    assert _decode(base64.b64decode(layers["composite"])).shape[:2] == (160, 240)

    pts = np.random.default_rng(0).uniform(4, 28, (48, 2)).tolist()
    r = http.post(f"{url}/v1/pix2pix", data={"landmarks": json.dumps({"labels": pts})}, timeout=60)
    assert r.status_code == 200 and _decode(r.content).shape == (32, 32, 3)
    heat = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    r = http.post(f"{url}/v1/pix2pix", files={"heatmap": _png(heat)}, timeout=60)
    assert r.status_code == 200


def test_bad_input_gets_4xx_and_the_service_survives(server) -> None:
    url = server["url"]
    good = _png(_img(40, 40))
    cases = [
        ("/v1/segment", {"files": {"image": b"this is not an image"}}, 400, "not a decodable image"),
        ("/v1/segment", {"files": {"image": good[: len(good) // 2]}}, 400, "not a decodable image"),
        ("/v1/segment", {"files": {"image": b""}}, 400, "empty"),
        ("/v1/segment", {"files": {"image": _png(np.zeros((10, 1100, 3), np.uint8))}}, 413, "limit is 1024"),
        ("/v1/segment", {}, 422, "missing file field 'image'"),
        (
            "/v1/harmonize",
            {"files": {"composite": good, "mask": _png(np.zeros((20, 20), np.uint8))}},
            400,
            "mask is 20x20",
        ),
        ("/v1/harmonize", {"files": {"composite": good, "mask": good}, "data": {"blend": "2"}}, 400, "blend"),
        ("/v1/composite", {"files": {"person": good, "background": good}, "data": {"x": "3"}}, 400, "x and y"),
        ("/v1/composite", {"files": {"person": good}}, 422, "'background'"),
        ("/v1/pix2pix", {"data": {"landmarks": json.dumps([[1, 2]] * 5)}}, 400, "48 [x, y]"),
        ("/v1/pix2pix", {"data": {"landmarks": "{nope"}}, 400, "not JSON"),
        ("/v1/pix2pix", {}, 422, "exactly one"),
    ]
    for path, kwargs, status, text in cases:
        r = http.post(f"{url}{path}", timeout=60, **kwargs)
        assert r.status_code == status, (path, kwargs.keys(), r.status_code, r.text)
        assert text in r.json()["detail"], (path, r.json())
    assert http.get(f"{url}/healthz", timeout=30).status_code == 200
    assert http.post(f"{url}/v1/segment", files={"image": good}, timeout=60).status_code == 200


def test_sixteen_concurrent_requests(server) -> None:
    url = server["url"]
    bg, person = _png(_img(128, 128, 5)), _png(_img(96, 64, 6))

    def call(i: int) -> int:
        return http.post(f"{url}/v1/composite", files={"person": person, "background": bg}, timeout=120).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(16)))
    assert codes == [200] * 16


def test_reload_switches_the_model_in_place(server) -> None:
    from montage.launch.local import fit_local
    from montage.serve.app import load_serve_config, run

    tmp = server["tmp"]
    new = fit_local(
        _tiny("segmentation", tmp, ["tracking.enabled=false", "train.max_steps=1", "run.name=seg2"])
    ).best_checkpoint
    run(load_serve_config(None, server["overrides"] + [f"segmentation.source={new}"]))
    health = http.get(f"{server['url']}/healthz", timeout=30).json()
    assert health["models"]["segmentation"] == new
    assert http.post(f"{server['url']}/v1/segment", files={"image": _png(_img(30, 30))}, timeout=60).status_code == 200


def test_reload_on_champion_serves_the_promoted_version(server) -> None:
    """Serve on ``@champion``, promote another version with different weights, ``--reload``:
    the answers are now that version's (checked against its checkpoint run locally)."""
    from montage.launch.local import fit_local
    from montage.platform.inference import load_predictor
    from montage.serve.app import load_serve_config, run
    from montage.tracking import registry as reg
    from montage.tracking.runs import create_run

    tmp = server["tmp"]
    uri, base = _registry(tmp, "registry")
    first = server["ckpts"]["segmentation"]
    other = fit_local(
        _tiny(
            "segmentation", tmp, ["tracking.enabled=false", "train.max_steps=1", "run.name=seg-other", "train.seed=7"]
        )
    ).best_checkpoint
    v1 = reg.register_checkpoint(base, first, create_run(base), "val/iou", "max", 0.5, "manual", {}, "better")
    v2 = reg.register_checkpoint(base, other, create_run(base), "val/iou", "max", 0.4, "manual", {}, "better")
    assert v1.promoted and not v2.promoted  # 0.4 < 0.5: the champion stays v1

    overrides = server["overrides"] + [
        "segmentation.source=models:/montage-segmentation@champion",
        f"tracking_uri={uri}",
    ]
    image = _img(40, 56, seed=5)

    def served_alpha() -> np.ndarray:
        r = http.post(f"{server['url']}/v1/segment", files={"image": _png(image)}, timeout=60)
        assert r.status_code == 200
        return _decode(r.content)[..., 3]

    def local_alpha(path: str) -> np.ndarray:
        return (load_predictor(path, task="segmentation")([image])[0] * 255).round().astype(np.uint8)

    assert np.abs(local_alpha(other).astype(int) - local_alpha(first)).max() > 3  # the two models answer differently
    run(load_serve_config(None, overrides))
    assert "v1" in http.get(f"{server['url']}/healthz", timeout=30).json()["models"]["segmentation"]
    before = served_alpha()
    assert np.abs(before.astype(int) - local_alpha(first)).max() <= 1

    reg.promote("segmentation", v2.version, uri)
    run(load_serve_config(None, overrides))  # what `montage serve --reload` does
    assert "v2" in http.get(f"{server['url']}/healthz", timeout=30).json()["models"]["segmentation"]
    after = served_alpha()
    assert np.abs(after.astype(int) - local_alpha(other)).max() <= 1
    assert np.abs(after.astype(int) - before).max() > 3  # and the service switched
    run(load_serve_config(None, server["overrides"]))  # back to the module's checkpoints


def test_onnx_and_openvino_variants_answer_the_same_endpoint(server) -> None:
    """Registered variants of the module's segmentation checkpoint, one reload after the other: an ONNX
    variant (``montage export``) with ``segmentation.runtime=onnx``, then an OpenVINO variant (``montage
    optimize --method openvino``) with no runtime named, whose ``montage.runtime`` tag makes the replica run
    the IR in OpenVINO. Each: the same HTTP API, the answers of the PyTorch model it was made from, batched
    requests (``@serve.batch`` through the variant's dynamic batch dimension) included."""
    from montage.serve.app import load_serve_config, run
    from montage.serve.rollout import HEADER
    from montage.tracking import registry as reg
    from montage.tracking.ov_variant import openvino_model
    from montage.tracking.runs import create_run
    from montage.tracking.variants import export_model

    tmp = server["tmp"]
    uri, base = _registry(tmp, "variants-registry")
    ckpt = server["ckpts"]["segmentation"]
    reg.register_checkpoint(base, ckpt, create_run(base), "val/iou", "max", 0.5, "manual", {}, "better")
    onnx = export_model(
        "segmentation", "models:/montage-segmentation/1", tmp / "seg.onnx", dynamic_batch=True, tracking_uri=uri
    )
    ov = openvino_model(
        "segmentation", "models:/montage-segmentation/1", tmp / "seg-openvino.xml", samples=2, tracking_uri=uri
    )
    image = _img(40, 56, seed=9)

    def segment() -> requests.Response:
        r = http.post(f"{server['url']}/v1/segment", files={"image": _png(image)}, timeout=60)
        assert r.status_code == 200
        return r

    def alpha(content: bytes) -> np.ndarray:
        return _decode(content)[..., 3].astype(int)

    def batched() -> list[bytes]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: segment().content, range(8)))

    torch_alpha = alpha(segment().content)  # the module's server runs this checkpoint in PyTorch
    over = server["overrides"] + [f"tracking_uri={uri}"]
    try:
        run(load_serve_config(None, over + [f"segmentation.source=models:/montage-segmentation/{onnx.version}",
                                            "segmentation.runtime=onnx"]))  # fmt: skip
        assert "onnx" in http.get(f"{server['url']}/healthz", timeout=30).json()["models"]["segmentation"]
        assert np.abs(alpha(segment().content) - torch_alpha).max() <= 1
        assert all(np.abs(alpha(a) - torch_alpha).max() <= 1 for a in batched())  # through ONNX Runtime

        run(load_serve_config(None, over + [f"segmentation.source=models:/montage-segmentation/{ov.version}"]))
        label = http.get(f"{server['url']}/healthz", timeout=30).json()["models"]["segmentation"]
        assert f"v{ov.version} (openvino of models:/montage-segmentation/1)" in label
        r = segment()
        assert f"segmentation=v{ov.version}-openvino" in r.headers[HEADER]
        assert np.abs(alpha(r.content) - torch_alpha).max() <= 1
        assert all(np.abs(alpha(a) - torch_alpha).max() <= 1 for a in batched())  # through the IR
    finally:
        run(load_serve_config(None, server["overrides"]))


def _registry(tmp, name: str):
    """(tracking URI, a segmentation config on it) for a registry of the test's own."""
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.tracking.runs import prepare_tracking

    uri = mlflow_store(tmp, f"{name}.db")
    tracking = [f"tracking.uri={uri}", f"tracking.artifacts={tmp / f'{name}-artifacts'}"]
    base = load_config("segmentation", TASKS.get("segmentation").spec, packaged_config("segmentation-smoke"), tracking)
    prepare_tracking(base)
    return uri, base


def test_tta_is_a_request_option(server) -> None:
    """``?tta=true`` averages with the mirrored image's prediction, so a mirrored input gets
    the mirrored answer (within a level of rounding); the same on /v1/composite."""
    image = _img(64, 64, seed=11)

    def alpha(img: np.ndarray, tta: str) -> np.ndarray:
        r = http.post(f"{server['url']}/v1/segment", files={"image": _png(img)}, params={"tta": tta}, timeout=60)
        assert r.status_code == 200
        return _decode(r.content)[..., 3].astype(int)

    assert np.abs(alpha(image[:, ::-1].copy(), "true") - alpha(image, "true")[:, ::-1]).max() <= 1
    assert alpha(image, "false").shape == (64, 64)
    r = http.post(
        f"{server['url']}/v1/composite",
        files={"person": _png(image), "background": _png(_img(80, 90, 3))},
        params={"tta": "true"},
        timeout=60,
    )
    assert r.status_code == 200 and _decode(r.content).shape[:2] == (80, 90)
