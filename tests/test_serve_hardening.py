"""Serve before it goes on a network, on the live application: API keys, CORS, bounded queues (503 +
Retry-After), the hand-picked bad-input corpus sent concurrently, schemathesis fuzzing of the OpenAPI
surface, and the page (``GET /``) driven in a real headless Chromium (the same guards without Ray:
test_serve_guards).

The application test_serve also uses (``serve_app``: auth on, a CORS allow-list, small size limits;
one start-up for both modules); the overload test reconfigures it with tiny queues, the fused-mode test
runs last and leaves it fused, and the module stops it."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from serve_helpers import ALLOWED_ORIGIN, MAX_BYTES, decode, img, pil_bytes, png, start, wait_healthy

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
needs_chromium = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver; .ci/run installs them)",
)


def _person(h: int = 240, w: int = 160) -> np.ndarray:
    """A person-like figure on a plain studio background."""
    out = np.zeros((h, w, 3), np.uint8)
    out[:] = (205, 215, 225)
    cv2.ellipse(out, (w // 2, int(h * 0.72)), (int(w * 0.3), int(h * 0.3)), 0, 0, 360, (40, 70, 150), -1)  # body
    cv2.circle(out, (w // 2, int(h * 0.28)), int(w * 0.17), (150, 110, 90), -1)  # head
    return out


def _background(h: int = 300, w: int = 420) -> np.ndarray:
    """Sky over a beach."""
    rows = np.linspace(0, 1, h)[:, None, None]
    sky = (1 - rows) * np.array([120, 170, 235]) + rows * np.array([200, 225, 245])
    out = np.broadcast_to(sky, (h, w, 3)).astype(np.uint8).copy()
    out[int(h * 0.65) :] = (225, 200, 150)
    return out


# --------------------------------------------------------------------------- live application


@pytest.fixture(scope="module")
def server(serve_app):
    yield {"url": serve_app.url, "key": serve_app.key, "session": serve_app.session, "overrides": serve_app.overrides}
    serve_app.stop()  # the last module that uses it


def _json_detail(r: requests.Response) -> object:
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.headers, r.text[:200])
    body = r.json()
    assert "detail" in body and body["detail"], body
    return body["detail"]


def test_api_keys_guard_v1_and_leave_health_open(server) -> None:
    url, s, good = server["url"], server["session"], png(img(40, 40))
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # load balancers need no key
    page = requests.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and 'data-auth="1"' in page.text and 'id="api-key"' in page.text

    r = requests.post(f"{url}/v1/segment", files={"image": good}, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in _json_detail(r)
    for header in (f"Bearer {server['key']}x", "Bearer ", f"Basic {server['key']}", server["key"]):
        r = requests.post(f"{url}/v1/segment", files={"image": good}, headers={"Authorization": header}, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", header
        _json_detail(r)
    r = s.post(f"{url}/v1/segment", files={"image": good}, timeout=60)
    assert r.status_code == 200 and decode(r.content).shape == (40, 40, 4)


def test_cors_allow_list(server) -> None:
    url = server["url"]
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    r = requests.options(f"{url}/v1/composite", headers={"Origin": ALLOWED_ORIGIN, **preflight}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = requests.options(f"{url}/v1/composite", headers={"Origin": "http://evil.example", **preflight}, timeout=30)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = server["session"].post(
        f"{url}/v1/segment", files={"image": png(img(20, 20))}, headers={"Origin": ALLOWED_ORIGIN}, timeout=60
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = requests.get(f"{url}/healthz", headers={"Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_oversized_body_refused_before_it_is_read(server) -> None:
    limit = 2 * MAX_BYTES + 1024 * 1024
    r = server["session"].post(f"{server['url']}/v1/segment", files={"image": b"\0" * (limit + 1)}, timeout=60)
    # the pre-read check's answer: the endpoint's own size check also says 413 "limit", but only after reading it all
    assert r.status_code == 413 and "the request body is" in _json_detail(r)


def _png_claiming(w: int, h: int) -> bytes:
    """A small valid-looking PNG whose header claims w×h pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg() -> bytes:
    """60 wide × 40 high as stored, EXIF orientation 6 (rotate 90° clockwise): shown 40 × 60."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    return pil_bytes(img(40, 60, 7), "JPEG", exif=exif)


def test_bad_input_corpus_sent_concurrently(server) -> None:
    """Each case a 4xx JSON ``detail`` (or 200 where the input is legitimately handled), never a
    5xx; 16 requests in flight at once; the replicas answer afterwards."""
    url, s = server["url"], server["session"]
    good = png(img(48, 32, 1))
    jpeg = pil_bytes(img(48, 32, 2), "JPEG")
    pts = np.random.default_rng(0).uniform(4, 28, (48, 2))
    gray16 = (np.random.default_rng(3).integers(0, 65535, (30, 20))).astype(np.uint16)
    rgba = np.dstack([img(30, 20, 4), np.full((30, 20), 128, np.uint8)])
    comp, mask = png(img(30, 40, 5)), png(np.full((30, 40), 255, np.uint8))
    seg, harm, compo, p2p = "/v1/segment", "/v1/harmonize", "/v1/composite", "/v1/pix2pix"
    both = {"person": good, "background": good}
    # (name, path, files, form, query, allowed statuses, text in detail, shape of a 200 answer)
    cases = [
        ("text", seg, {"image": b"hello, I am not an image"}, {}, {}, {400}, "not a decodable image", None),
        (
            "pdf",
            seg,
            {"image": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n"},
            {},
            {},
            {400},
            "not a decodable image",
            None,
        ),
        (
            "html-as-png",
            seg,
            {"image": ("x.png", b"<html><body>hi</body></html>", "image/png")},
            {},
            {},
            {400},
            "not a decodable image",
            None,
        ),
        ("truncated png", seg, {"image": good[: len(good) // 3]}, {}, {}, {400}, "not a decodable image", None),
        (
            "truncated jpeg",
            seg,
            {"image": jpeg[: len(jpeg) // 2]},
            {},
            {},
            {200, 400},
            None,
            (48, 32, 4),
        ),  # libjpeg may return the top half
        ("png header only", seg, {"image": good[:33]}, {}, {}, {400}, "not a decodable image", None),
        ("zero bytes", seg, {"image": b""}, {}, {}, {400}, "empty", None),
        ("bomb 50000x50000", seg, {"image": _png_claiming(50000, 50000)}, {}, {}, {413}, "limit is 1024", None),
        (
            "bomb 20000x20000",
            compo,
            {"person": good, "background": _png_claiming(20000, 20000)},
            {},
            {},
            {413},
            "'background'",
            None,
        ),
        (
            "exif rotated",
            seg,
            {"image": _exif_rotated_jpeg()},
            {},
            {},
            {200},
            None,
            (60, 40, 4),
        ),  # oriented like the input is shown
        ("16-bit png", seg, {"image": png(gray16)}, {}, {}, {200}, None, (30, 20, 4)),
        ("grayscale", seg, {"image": png(img(30, 20)[..., 0])}, {}, {}, {200}, None, (30, 20, 4)),
        ("rgba person", compo, {"person": png(rgba), "background": good}, {}, {}, {200}, None, (48, 32, 3)),
        ("cmyk jpeg", seg, {"image": pil_bytes(img(30, 20, 6), "JPEG", mode="CMYK")}, {}, {}, {200}, None, (30, 20, 4)),
        (
            "exif rotated mask",
            harm,
            {"composite": png(img(60, 40, 10)), "mask": _exif_rotated_jpeg()},
            {},
            {},
            {200},
            None,
            (60, 40, 3),
        ),
        (
            "mask other size",
            harm,
            {"composite": comp, "mask": png(np.zeros((20, 20), np.uint8))},
            {},
            {},
            {400},
            "mask is 20x20",
            None,
        ),
        ("mask not an image", harm, {"composite": comp, "mask": b"nope"}, {}, {}, {400}, "'mask'", None),
        ("blend > 1", harm, {"composite": comp, "mask": mask}, {"blend": "1.5"}, {}, {400}, "blend", None),
        ("blend nan", compo, both, {"blend": "nan"}, {}, {400}, "blend", None),
        ("x < 0", compo, both, {"x": "-0.1"}, {}, {400}, "x and y", None),
        ("y > 1", compo, both, {"y": "1.01"}, {}, {400}, "x and y", None),
        ("x inf", compo, both, {"x": "inf"}, {}, {400}, "x and y", None),
        ("x text", compo, both, {"x": "left"}, {}, {422}, None, None),
        ("scale 0", compo, both, {"scale": "0"}, {}, {400}, "scale", None),
        ("scale 1e9", compo, both, {"scale": "1e9"}, {}, {400}, "scale", None),
        ("return bogus", compo, both, {}, {"return": "zip"}, {400}, "return must be", None),
        ("threshold 2", seg, {"image": good}, {}, {"threshold": "2"}, {400}, "threshold", None),
        ("landmarks 47", p2p, {}, {"landmarks": json.dumps(pts[:47].tolist())}, {}, {400}, "48 [x, y]", None),
        ("landmarks 48x3", p2p, {}, {"landmarks": json.dumps(np.ones((48, 3)).tolist())}, {}, {400}, "48 [x, y]", None),
        ("landmarks ragged", p2p, {}, {"landmarks": json.dumps([[1, [2, 3]]] * 48)}, {}, {400}, None, None),
        (
            "landmarks NaN",
            p2p,
            {},
            {"landmarks": json.dumps([[math.nan, 1.0]] + pts[1:].tolist())},
            {},
            {400},
            "NaN",
            None,
        ),
        (
            "landmarks null",
            p2p,
            {},
            {"landmarks": json.dumps([[None, 1]] + pts[1:].tolist())},
            {},
            {400},
            "landmarks",
            None,
        ),
        ("landmarks strings", p2p, {}, {"landmarks": json.dumps([["a", "b"]] * 48)}, {}, {400}, "numbers", None),
        ("landmarks scalar", p2p, {}, {"landmarks": "7"}, {}, {400}, "48 [x, y]", None),
        (
            "landmarks huge",
            p2p,
            {},
            {"landmarks": json.dumps((pts * 1e300).tolist())},
            {},
            {200, 400},
            None,
            (32, 32, 3),
        ),
        ("landmarks ok", p2p, {}, {"landmarks": json.dumps({"labels": pts.tolist()})}, {}, {200}, None, (32, 32, 3)),
        ("heatmap 16-bit", p2p, {"heatmap": png(gray16)}, {}, {}, {200}, None, (32, 32, 3)),
    ]

    def call(case):
        name, path, files, data, params, _, _, _ = case
        t0 = time.monotonic()
        r = s.post(f"{url}{path}", files=files or None, data=data or None, params=params, timeout=120)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, cases))
    for case, (r, took) in zip(cases, answers):
        name, _, _, _, _, allowed, text, shape = case
        assert r.status_code < 500, (name, r.status_code, r.text[:300])
        assert r.status_code in allowed, (name, r.status_code, r.text[:300])
        if r.status_code >= 400:
            detail = _json_detail(r)
            if text:
                assert text in str(detail), (name, detail)
        elif shape is not None:
            assert decode(r.content).shape == shape, (name, decode(r.content).shape)
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert s.post(f"{url}{seg}", files={"image": good}, timeout=60).status_code == 200  # the replicas survived


def test_schemathesis_fuzz_of_the_openapi_surface(server) -> None:
    """Generated requests (valid and invalid) for every operation of /openapi.json: never a 5xx,
    every 4xx a JSON ``detail``."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    url, s = server["url"], server["session"]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/segment", "/v1/harmonize", "/v1/composite", "/v1/pix2pix", "/healthz"} <= {
        op.path for op in operations
    }
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=6,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case) -> None:
                response = case.call_and_validate(session=s, checks=[not_a_server_error], timeout=60)
                seen.setdefault(op.path, set()).add(response.status_code)
                if 400 <= response.status_code < 500:
                    assert "detail" in response.json(), (op.path, response.status_code, response.text[:200])

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no parameters)
                assert mode == GenerationMode.NEGATIVE, op.path
    assert all(code < 500 for codes in seen.values() for code in codes), seen
    assert any(400 <= code < 500 for code in seen.get("/v1/segment", ())), seen  # the fuzzer did reach the validation
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # the packaged driver: no download
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@needs_chromium
def test_page_composites_in_a_real_browser(server, browser, tmp_path) -> None:
    """``GET /`` in a real headless Chromium (Selenium 4) with API keys on: pick two photos, move a
    slider, composite, see the three layers at the right sizes and a download link; without the
    key and with a non-image the errors show inline. ``MONTAGE_PAGE_SCREENSHOT=docs/serve_page.png``
    also saves the README's screenshot (the test itself writes only under tmp_path)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    person, background = tmp_path / "person.png", tmp_path / "beach.png"
    person.write_bytes(png(_person()))
    background.write_bytes(png(_background()))
    (tmp_path / "notes.txt").write_text("this is not a photo")
    wait = WebDriverWait(browser, 60)
    find = lambda id_: browser.find_element(By.ID, id_)
    error_text = lambda: find("error").text if find("error").is_displayed() else ""

    browser.get(server["url"] + "/")
    assert "montage" in browser.title and find("key-row").is_displayed()  # auth is on: the key field shows
    find("person").send_keys(str(person))
    find("background").send_keys(str(background))
    wait.until(
        lambda d: d.execute_script("return document.getElementById('background-preview').naturalWidth") == 420
    )  # previews
    scale = find("scale")
    for _ in range(5):
        scale.send_keys(Keys.ARROW_LEFT)  # 0.70 → 0.65: moved like a user moves it
    assert browser.find_element(By.CSS_SELECTOR, 'output[for="scale"]').text == "0.65"

    find("go").click()  # no key yet: the 401 shows inline
    wait.until(lambda d: "401" in error_text())
    assert "Authorization" in error_text()

    find("api-key").send_keys(server["key"])
    find("go").click()
    wait.until(lambda d: find("status").text == "done")
    assert not find("error").is_displayed()
    sizes = {
        id_: browser.execute_script(
            f"const i = document.getElementById('{id_}'); return [i.naturalWidth, i.naturalHeight]"
        )
        for id_ in ("result-image", "result-composite", "result-alpha")
    }
    assert sizes == {"result-image": [420, 300], "result-composite": [420, 300], "result-alpha": [160, 240]}, sizes
    href = find("download").get_attribute("href")
    assert href.startswith("data:image/png;base64,") and find("download").get_attribute("aria-disabled") == "false"
    shot = tmp_path / "serve_page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MONTAGE_PAGE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MONTAGE_PAGE_SCREENSHOT"])

    find("person").send_keys(str(tmp_path / "notes.txt"))  # a non-image: the server's 400 detail, inline
    find("go").click()
    wait.until(lambda d: "400" in error_text())
    assert "'person' is not a decodable image" in error_text()
    wait.until(ec.element_to_be_clickable((By.ID, "go")))
    assert requests.get(server["url"] + "/healthz", timeout=30).status_code == 200


def test_overload_burst_gets_200_or_503_with_retry_after(server) -> None:
    """64 concurrent requests against one replica each, queues of 8 (ingress) and 1 (models):
    every answer is 200 or 503 + Retry-After within a bound, and the service answers afterwards.
    A full ingress queue is answered by Serve's proxy (plain text); a full model queue by the
    ingress (JSON ``detail``)."""
    url, s = server["url"], server["session"]
    tight = (
        ["ingress_max_ongoing_requests=8", "ingress_max_queued_requests=8", "retry_after_s=2"]
        + [
            f"{t}.{k}"
            for t in ("segmentation", "harmonization")
            for k in ("max_ongoing_requests=1", "max_queued_requests=1")
        ]
        + ["segmentation.batch_wait_timeout_s=0.3"]
    )  # a batch of 8 that never fills: each call holds the one slot 0.3 s
    start(server["overrides"] + tight)
    wait_healthy(url)
    person, bg = png(img(64, 48, 8)), png(img(96, 96, 9))

    def call(_: int):
        t0 = time.monotonic()
        r = s.post(f"{url}/v1/composite", files={"person": person, "background": bg}, timeout=60)
        return r, time.monotonic() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(call, range(64)))
    total = time.monotonic() - t0
    codes = [r.status_code for r, _ in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    rejected = [(r, took) for r, took in answers if r.status_code == 503]
    for r, took in rejected:
        assert r.headers.get("retry-after") == "2", r.headers
        assert took < 10, took  # refused quickly, not after queueing
    kinds = {
        "json" if r.headers.get("content-type", "").startswith("application/json") else "proxy" for r, _ in rejected
    }
    assert kinds == {"json", "proxy"}, (
        kinds
    )  # both layers refused: the proxy (ingress queue) and the ingress (model queue)
    for r, _ in rejected:
        if r.headers.get("content-type", "").startswith("application/json"):
            assert "overloaded" in r.json()["detail"] and "backpressure" in r.json()["detail"]
        else:
            assert r.headers["content-type"].startswith("text/plain") and "backpressure" in r.text
    assert max(took for _, took in answers) < 45 and total < 60, (total, kinds)
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert s.post(f"{url}/v1/composite", files={"person": person, "background": bg}, timeout=60).status_code == 200


def test_fused_mode_answers_like_the_graph(server) -> None:
    """``fused: true`` runs the models inside the ingress replica (no handle hops): the same
    answers, the same /healthz and /v1/monitor. Last of the shared application's tests: it leaves the
    application fused (restoring the graph would start its three model replicas and its ingress again)."""
    from montage.serve.app import load_serve_config, run

    url, s = server["url"], server["session"]
    files = {"person": png(img(70, 50, 4)), "background": png(img(90, 120, 5))}
    graph = s.post(f"{url}/v1/composite", files=files, data={"x": "0.4"}, timeout=60)  # (the overload limits)
    run(load_serve_config(None, server["overrides"] + ["fused=true"]))
    fused = s.post(f"{url}/v1/composite", files=files, data={"x": "0.4"}, timeout=60)
    assert graph.status_code == fused.status_code == 200
    assert np.abs(decode(graph.content).astype(int) - decode(fused.content).astype(int)).max() <= 1
    assert set(s.get(f"{url}/healthz", timeout=30).json()["models"]) == {"segmentation", "harmonization", "pix2pix"}
    doc = s.get(f"{url}/v1/monitor", timeout=30).json()
    assert doc["models"]["segmentation"]["batch_size"]["batches"] >= 1  # the fused model's own monitor
