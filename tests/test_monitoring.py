"""Monitoring of the Serve graph (issue 18): Ray Serve metrics on the metrics export port, a real
Prometheus server over them, drift against the reference stored at registration, /v1/monitor
and ``montage monitor``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import requests
from conftest import _tiny
from serve_helpers import delete_app, scrape
from serve_helpers import free_port as _free_port
from serve_helpers import img as _img
from serve_helpers import png as _png
from stores import mlflow_store

APP = "montage-mon"
N_COMPOSITE = 5
N_HARMONIZE_OK = 3
HARMONIZE_ERRORS = {"400": 2, "422": 1}


# -- without Ray ------------------------------------------------------------------------------


def test_features_psi_and_drift_detector(caplog) -> None:
    from montage.platform.features import alpha_features, input_features, psi
    from montage.serve.drift import DriftDetector

    rng = np.random.default_rng(0)
    ref, same, shifted = rng.normal(0, 1, 500), rng.normal(0, 1, 200), rng.normal(1.5, 1, 200)
    assert psi(ref, same) < 0.1 < 0.25 < psi(ref, shifted)
    assert (
        psi([32.0] * 100, [32.0] * 50) < 1e-6 and psi([32.0] * 100, [64.0] * 50) > 1
    )  # a discrete feature gets its own bins

    img = _img(60, 90)
    f, dark = input_features(img), input_features((img * 0.3).astype(np.uint8))
    assert (f["width"], f["height"], f["aspect"]) == (90, 60, 1.5) and dark["brightness"] < 0.4 * f["brightness"]
    crisp = np.zeros((64, 64), np.float32)
    crisp[16:48, 16:48] = 1
    soft = cv2.GaussianBlur(crisp, (0, 0), 4)
    assert alpha_features(crisp)["uncertain_alpha"] == 0 and alpha_features(soft)["uncertain_alpha"] > 0.1
    assert alpha_features(crisp)["alpha_edge_sharpness"] > alpha_features(soft)["alpha_edge_sharpness"]

    reference = {"features": {"x": {"values": ref.tolist()}, "w": {"values": [32.0] * 100}}}
    det = DriftDetector(reference, window=100, min_samples=50, check_every=10)
    for v in same[:100]:
        det.add({"x": v, "w": 32.0})
    assert det.summary()["drifted"] == []
    for v in shifted[:100]:
        det.add({"x": v, "w": 32.0})
    assert det.summary()["drifted"] == ["x"] and det.state["w"].psi < 1e-6
    warned = [r for r in caplog.records if "input drift" in r.getMessage()]
    assert len(warned) == 1 and "'x'" in warned[0].getMessage()  # once, when it crossed
    assert det.out_of_range("x", 10.0) and not det.out_of_range(
        "x", 0.0
    )  # output anomalies: outside the reference's central 99 %


# -- one served application for the rest -------------------------------------------------------


def _registry(tmp: Path) -> tuple[str, Any]:
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.tracking.runs import prepare_tracking

    uri = mlflow_store(tmp, "mon.db")
    tracking = [f"tracking.uri={uri}", f"tracking.artifacts={tmp / 'mon-artifacts'}"]
    base = load_config("segmentation", TASKS.get("segmentation").spec, packaged_config("segmentation-smoke"), tracking)
    prepare_tracking(base)
    return uri, base


@pytest.fixture(scope="module")
def mon(ray_session, serve_port, tmp_path_factory):
    """Segmentation served from a registered version (its stored drift reference), harmonization
    from a plain checkpoint (reference computed on the fly)."""

    from montage.launch.local import fit_local
    from montage.serve.app import load_serve_config, run
    from montage.tracking.registry import register_checkpoint
    from montage.tracking.runs import create_run

    tmp = tmp_path_factory.mktemp("monitoring")
    data = [
        "data.synthetic_train=300",
        "data.synthetic_val=64",
    ]  # a 256-sample reference; 64 in-distribution images to send
    seg = fit_local(
        _tiny("segmentation", tmp, ["tracking.enabled=false", "train.max_steps=1", "run.name=seg", *data])
    ).best_checkpoint
    harm = fit_local(
        _tiny("harmonization", tmp, ["tracking.enabled=false", "train.max_steps=1", "run.name=harm"])
    ).best_checkpoint
    uri, base = _registry(tmp)
    reg = register_checkpoint(base, seg, create_run(base), "val/iou", "max", 0.5, "manual", {}, "always")
    port = serve_port
    run(
        load_serve_config(
            None,
            [
                f"port={port}",
                f"name={APP}",
                "max_side=1024",
                f"tracking_uri={uri}",
                "pix2pix.enabled=false",
                f"segmentation.source=models:/montage-segmentation/{reg.version}",
                f"harmonization.source={harm}",
                "monitoring.window=64",
                "monitoring.min_samples=30",
                "monitoring.check_every=5",
            ],
        )
    )
    yield {
        "url": f"http://127.0.0.1:{port}",
        "seg": seg,
        "uri": uri,
        "version": reg.version,
        "tmp": tmp,
        "metrics_port": ray_session.nodes()[0]["MetricsExportPort"],
    }
    delete_app(APP)


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(
        v
        for n, lab, v in samples
        if n == name and lab.get("application") == APP and all(lab.get(k) == x for k, x in labels.items())
    )


def _wait(check: Callable[[], bool], timeout: float = 40, what: str = "") -> None:
    """Ray's agent refreshes the exported values every few seconds."""
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_registration_stores_a_drift_reference(mon) -> None:
    from montage.tracking.drift import REFERENCE_FILE, find_reference
    from montage.tracking.registry import download_model_checkpoint

    ckpt = download_model_checkpoint(f"models:/montage-segmentation/{mon['version']}", mon["uri"])
    ref = find_reference(ckpt)
    assert ref is not None and any(p.name == REFERENCE_FILE for p in Path(ckpt).parents[1].rglob("*.json"))
    assert ref["task"] == "segmentation" and ref["samples"] == 256  # 256 of the 300 training samples
    feats = ref["features"]
    assert {
        "brightness",
        "contrast",
        "saturation",
        "sharpness",
        "colour_temperature",
        "width",
        "height",
        "aspect",
        "foreground_fraction",
        "uncertain_alpha",
    } <= set(feats)
    assert len(feats["brightness"]["values"]) == 256 and 0 < feats["brightness"]["quantiles"]["0.5"] < 1


def test_metrics_count_requests_stages_and_errors(mon) -> None:
    url = mon["url"]
    bg, person = _png(_img(96, 128, 1)), _png(_img(64, 40, 2))
    for _ in range(N_COMPOSITE):
        assert (
            requests.post(f"{url}/v1/composite", files={"person": person, "background": bg}, timeout=60).status_code
            == 200
        )
    comp, mask = _img(48, 40, 3), np.zeros((48, 40), np.uint8)
    mask[10:30, 10:30] = 255
    for _ in range(N_HARMONIZE_OK):
        assert (
            requests.post(
                f"{url}/v1/harmonize", files={"composite": _png(comp), "mask": _png(mask)}, timeout=60
            ).status_code
            == 200
        )
    for _ in range(HARMONIZE_ERRORS["400"]):
        assert (
            requests.post(
                f"{url}/v1/harmonize", files={"composite": b"not an image", "mask": _png(mask)}, timeout=60
            ).status_code
            == 400
        )
    assert requests.post(f"{url}/v1/harmonize", files={"mask": _png(mask)}, timeout=60).status_code == 422

    port = mon["metrics_port"]
    ep = {"endpoint": "/v1/composite"}

    def complete() -> bool:
        # every process exports its own series on its own interval: wait for the ingress's and for each
        # model replica's last one (the Segmenter's count once lagged the ingress's by one request)
        s = scrape(port)
        seg = {"model": "segmentation", "version": f"v{mon['version']}"}
        return (
            _total(s, "ray_montage_stage_latency_ms_count", stage="encode", **ep) == N_COMPOSITE
            and _total(s, "ray_montage_errors_total", endpoint="/v1/harmonize") == sum(HARMONIZE_ERRORS.values())
            and _total(s, "ray_montage_images_total", **seg) == N_COMPOSITE
            and _total(s, "ray_montage_output_quality_count", metric="colour_change", model="harmonization")
            == N_COMPOSITE + N_HARMONIZE_OK
        )

    _wait(complete, what="the montage series on Ray's metrics port")
    s = scrape(port)
    for name in ("decode", "segment", "paste", "harmonize", "encode"):  # every stage of every request, exactly
        want = 2 * N_COMPOSITE if name == "decode" else N_COMPOSITE  # person and background are both decoded
        assert _total(s, "ray_montage_stage_latency_ms_count", stage=name, **ep) == want, name
    assert _total(s, "ray_montage_request_latency_ms_count", **ep) == N_COMPOSITE
    assert _total(s, "ray_montage_requests_total", status="200", **ep) == N_COMPOSITE
    h = {"endpoint": "/v1/harmonize"}
    assert _total(s, "ray_montage_requests_total", status="200", **h) == N_HARMONIZE_OK
    for status, n in HARMONIZE_ERRORS.items():
        assert _total(s, "ray_montage_errors_total", status=status, **h) == n
        assert _total(s, "ray_montage_requests_total", status=status, **h) == n
    assert (
        _total(s, "ray_montage_stage_latency_ms_count", stage="harmonize", **h) == N_HARMONIZE_OK
    )  # failed requests never reached it
    # 5 ms resolves from 2000 ms: the buckets span both
    bounds = {
        float(lab["le"])
        for n, lab, _ in s
        if n == "ray_montage_stage_latency_ms_bucket" and lab.get("application") == APP and lab["le"] != "+Inf"
    }
    assert {5.0, 2000.0} <= bounds
    assert _total(s, "ray_montage_input_width_px_count", **ep) == 2 * N_COMPOSITE
    assert (
        _total(s, "ray_montage_input_width_px_bucket", le="32.0", **ep) == 0
    )  # cumulative buckets: the 40 px person, the 128 px background
    assert _total(s, "ray_montage_input_width_px_bucket", le="64.0", **ep) == N_COMPOSITE
    assert _total(s, "ray_montage_input_width_px_bucket", le="128.0", **ep) == 2 * N_COMPOSITE
    # model series carry the version: segmentation is registry version N
    seg = {"model": "segmentation", "version": f"v{mon['version']}"}
    assert (
        1 <= _total(s, "ray_montage_batch_size_count", **seg) <= N_COMPOSITE
    )  # one observation per batch formed (Ray's exported _sum is approximate)
    assert _total(s, "ray_montage_images_total", **seg) == N_COMPOSITE
    assert _total(s, "ray_montage_output_quality_count", metric="uncertain_alpha", **seg) == N_COMPOSITE
    assert (
        _total(s, "ray_montage_output_quality_count", metric="colour_change", model="harmonization")
        == N_COMPOSITE + N_HARMONIZE_OK
    )


def test_prometheus_server_scrapes_the_series(mon, tmp_path) -> None:
    """A real Prometheus on Ray's metrics port; PromQL through its HTTP API."""
    binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        pytest.skip("no prometheus binary (apt-get install -y prometheus); .ci/run installs it")
    repo = Path(__file__).resolve().parents[1]
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if Path(promtool).exists():  # the shipped scrape config is valid
        check = subprocess.run(
            [promtool, "check", "config", str(repo / "deploy/prometheus/prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    sd = tmp_path / "targets.json"  # the file-based discovery Ray's head writes, for this session's node
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{mon['metrics_port']}"]}]))
    cfg = (
        (repo / "deploy/prometheus/prometheus.yml")
        .read_text()
        .replace("/tmp/ray/prom_metrics_service_discovery.json", str(sd))
    )
    cfg = cfg.replace("scrape_interval: 10s", "scrape_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(cfg)
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    query = f'sum(ray_montage_stage_latency_ms_count{{application="{APP}",endpoint="/v1/composite",stage="harmonize"}})'
    try:

        def answered() -> bool:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
            except (requests.RequestException, ValueError):
                return False
            res = r.get("data", {}).get("result", [])
            return bool(res) and float(res[0]["value"][1]) == N_COMPOSITE

        _wait(answered, timeout=45, what=f"PromQL {query} == {N_COMPOSITE}; log: {tmp_path / 'prometheus.log'}")
        # every query of the Grafana dashboard is valid PromQL over series that exist
        dash = json.loads((repo / "deploy/grafana/montage.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        for expr in exprs:
            q = expr.replace("$__rate_interval", "1m").replace("$application", ".*").replace("$endpoint", ".*")
            r = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=10).json()
            assert r["status"] == "success", (expr, r)
        names = {m for e in exprs for m in re.findall(r"ray_montage_\w+", e)}
        have = requests.get(f"http://127.0.0.1:{port}/api/v1/label/__name__/values", timeout=10).json()["data"]
        # these need a challenger: tests/test_rollout.py finds them on the metrics port
        rollout_only = {"ray_montage_arm_latency_ms_bucket", "ray_montage_arm_requests_total"}
        rollout_only |= {"ray_montage_shadow_agreement_sum", "ray_montage_shadow_agreement_count"}
        absent = {"ray_montage_anomalies_total", "ray_montage_drift_score", "ray_montage_drifted"} | rollout_only
        assert names - absent <= set(have), names - set(have)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _in_distribution(checkpoint: str, n: int) -> list[np.ndarray]:
    """Validation images of the checkpoint's own data config: the training distribution."""
    from montage.platform.inference import load_for_inference

    inst, _ = load_for_inference(checkpoint, "segmentation", "cpu")
    _, val = inst.datasets()
    return [val.source.load(i % len(val.source))[0] for i in range(n)]


def _segment_all(url: str, images: list[np.ndarray]) -> None:
    with ThreadPoolExecutor(4) as pool:
        codes = list(
            pool.map(
                lambda im: requests.post(f"{url}/v1/segment", files={"image": _png(im)}, timeout=60).status_code, images
            )
        )
    assert codes == [200] * len(images)


def test_drift_of_a_darker_stream(mon) -> None:
    url = mon["url"]
    images = _in_distribution(mon["seg"], 64)
    _segment_all(url, images)  # fills the window (the composites' random-noise persons leave it)
    seg = requests.get(f"{url}/v1/monitor", timeout=30).json()["models"]["segmentation"]
    assert seg["reference"] == "stored" and seg["drift"]["samples"] == 64
    assert seg["drift"]["drifted"] == [], seg["drift"]
    assert (
        seg["drift"]["features"]["brightness"]["p_value"] > 0.01
    )  # (PSI alone is noisy on 64 samples: the flag needs both)

    _segment_all(url, [(im * 0.3).astype(np.uint8) for im in images])  # the whole window, much darker
    summary = requests.get(f"{url}/v1/monitor", timeout=30).json()
    drift = summary["models"]["segmentation"]["drift"]
    assert "brightness" in drift["drifted"], drift
    assert drift["features"]["brightness"]["psi"] > 0.25 and drift["features"]["brightness"]["p_value"] < 0.01
    for unrelated in ("width", "height", "aspect"):
        assert unrelated not in drift["drifted"] and drift["features"][unrelated]["psi"] < 0.25
    assert summary["models"]["harmonization"]["reference"] in (
        "computed",
        "pending",
    )  # a plain checkpoint: computed on the fly

    seg_tags = {"model": "segmentation", "version": f"v{mon['version']}"}

    def flagged() -> bool:
        s = scrape(mon["metrics_port"])
        return (
            _total(s, "ray_montage_drifted", feature="brightness", **seg_tags) == 1
            and _total(s, "ray_montage_drifted", feature="width", **seg_tags) == 0
        )

    _wait(flagged, what="montage_drifted{feature=brightness} == 1 on the metrics port")
    s = scrape(mon["metrics_port"])
    assert _total(s, "ray_montage_drift_score", feature="brightness", method="psi", **seg_tags) > 0.25


def test_monitor_summary_and_cli(mon, capsys) -> None:
    from montage.cli import main

    summary = requests.get(f"{mon['url']}/v1/monitor", timeout=30).json()
    comp = summary["endpoints"]["/v1/composite"]
    assert comp["requests"] == N_COMPOSITE and comp["error_rate"] == 0
    assert set(comp["stages"]) == {"decode", "segment", "paste", "harmonize", "encode"}
    assert 0 < comp["stages"]["harmonize"]["p50"] <= comp["stages"]["harmonize"]["p99"]
    harm = summary["endpoints"]["/v1/harmonize"]
    assert harm["errors"] == HARMONIZE_ERRORS and abs(harm["error_rate"] - 3 / 6) < 1e-6
    assert summary["models"]["segmentation"]["version"] == f"v{mon['version']}"
    assert (
        summary["models"]["segmentation"]["images"] >= N_COMPOSITE + 128
        and summary["models"]["segmentation"]["images_per_s"] > 0
    )
    assert summary["models"]["harmonization"]["reference"] == "computed"

    png = mon["tmp"] / "monitor.png"
    assert main(["monitor", "--url", mon["url"], "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "/v1/composite" in out and "harmonize" in out and "brightness" in out and "DRIFTED" in out
    assert png.stat().st_size > 1000
