"""Champion and challenger in one real Serve application: a canary for segmentation (registry
aliases), a shadow for harmonization (checkpoints), compared in /v1/monitor, ended through the
registry by `montage rollout`, and reloads onto models that do not load."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import _tiny
from serve_helpers import Load, decode, delete_app, img, png, scrape, wait_until
from stores import mlflow_store

from montage.core import schema

SEG = "montage-segmentation"


def _fit(tmp, task: str, name: str, seed: int) -> str:
    from montage.launch.local import fit_local

    over = ["tracking.enabled=false", "train.max_steps=1", f"run.name={name}", f"train.seed={seed}"]
    return fit_local(_tiny(task, tmp, over)).best_checkpoint


@pytest.fixture(scope="module")
def app(ray_session, serve_port, tmp_path_factory):

    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.serve.app import load_serve_config, run
    from montage.tracking import registry as reg
    from montage.tracking.runs import create_run, prepare_tracking

    tmp = tmp_path_factory.mktemp("rollout")
    ck = {
        "seg1": _fit(tmp, "segmentation", "seg1", 0),
        "seg2": _fit(tmp, "segmentation", "seg2", 7),
        "harm1": _fit(tmp, "harmonization", "harm1", 0),
        "harm2": _fit(tmp, "harmonization", "harm2", 7),
    }
    uri = mlflow_store(tmp, "reg.db")
    base = load_config(
        "segmentation",
        TASKS.get("segmentation").spec,
        packaged_config("segmentation-smoke"),
        [f"tracking.uri={uri}", f"tracking.artifacts={tmp / 'artifacts'}"],
    )
    prepare_tracking(base)
    for key, value in (("seg1", 0.5), ("seg2", 0.4)):
        reg.register_checkpoint(base, ck[key], create_run(base), "val/iou", "max", value, "manual", {}, "better")
    reg.client(uri).set_registered_model_alias(SEG, "challenger", "2")
    port = serve_port
    overrides = [
        f"port={port}",
        f"tracking_uri={uri}",
        f"segmentation.source=models:/{SEG}@champion",
        f"segmentation.challenger=models:/{SEG}@challenger",
        "segmentation.rollout.traffic=0.5",
        "segmentation.rollout.rules.min_requests=10",
        f"harmonization.source={ck['harm1']}",
        f"harmonization.challenger={ck['harm2']}",
        "harmonization.rollout.mode=shadow",
        "monitoring.reference_samples=16",  # the drift references the replicas compute for the checkpoints
    ]
    run(load_serve_config(None, overrides))
    yield {
        "url": f"http://127.0.0.1:{port}",
        "ck": ck,
        "uri": uri,
        "overrides": overrides,
        "tmp": tmp,
        "metrics_port": ray_session.nodes()[0]["MetricsExportPort"],
    }
    delete_app()


def _versions(r: requests.Response) -> dict[str, tuple[str, str]]:
    """``X-Montage-Model-Version`` (one per stage; requests joins repeated headers with ', ')."""
    out = {}
    for part in r.headers["x-montage-model-version"].split(", "):
        task, _, rest = part.partition("=")
        version, _, arm = rest.partition("; arm=")
        out[task] = (version, arm)
    return out


def test_canary_is_sticky_and_every_answer_names_its_version(app) -> None:
    from montage.platform.inference import load_predictor

    url, image = app["url"], img(40, 48, seed=3)
    local = {
        arm: (load_predictor(app["ck"][k], task="segmentation")([image])[0] * 255).round()
        for arm, k in (("champion", "seg1"), ("challenger", "seg2"))
    }
    assert np.abs(local["champion"] - local["challenger"]).max() > 3  # the arms answer differently
    seen: dict[str, set[str]] = {}
    for client in range(12):
        for _ in range(2):
            r = requests.post(
                f"{url}/v1/segment", files={"image": png(image)}, headers={"X-Montage-Client": f"u{client}"}, timeout=60
            )
            assert r.status_code == 200
            version, arm = _versions(r)["segmentation"]
            assert version == {"champion": "v1", "challenger": "v2"}[arm]
            assert np.abs(decode(r.content)[..., 3] - local[arm]).max() <= 1  # that arm's model answered
            seen.setdefault(f"u{client}", set()).add(arm)
    assert all(len(arms) == 1 for arms in seen.values())  # sticky per caller
    assert {a for arms in seen.values() for a in arms} == {"champion", "challenger"}  # 12 callers at 50 %

    r = requests.post(
        f"{url}/v1/composite",
        files={"person": png(img(50, 40, 1)), "background": png(img(60, 70, 2))},
        params={"return": "layers"},
        timeout=60,
    )
    stages = _versions(r)
    assert set(stages) == {"segmentation", "harmonization"} and stages["harmonization"][1] == "champion"
    versions = r.json()["versions"]
    assert versions["harmonization"] == {"version": stages["harmonization"][0], "arm": "champion"}
    assert decode(base64.b64decode(r.json()["image"])).shape[:2] == (60, 70)
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and "v2" in health["challengers"]["segmentation"]


def test_monitor_compares_the_arms_and_measures_the_shadow(app, capsys) -> None:
    from montage.cli import main

    url = app["url"]
    comp = img(48, 48, 5)
    mask = np.zeros((48, 48), np.uint8)
    mask[8:40, 10:38] = 255
    for _ in range(12):  # shadow: the champion answers, the challenger runs on the same input afterwards
        r = requests.post(f"{url}/v1/harmonize", files={"composite": png(comp), "mask": png(mask)}, timeout=60)
        assert r.status_code == 200 and _versions(r)["harmonization"][1] == "champion"
    for i in range(12):
        requests.post(f"{url}/v1/segment", files={"image": png(img(32, 32, i))}, timeout=60)
    end = time.monotonic() + 20
    while True:
        doc = requests.get(f"{url}/v1/monitor", timeout=30).json()
        harm = doc["rollout"]["harmonization"]
        if harm["arms"]["challenger"]["requests"] >= 12 or time.monotonic() > end:
            break
        time.sleep(0.3)
    assert harm["mode"] == "shadow" and harm["arms"]["champion"]["requests"] == harm["arms"]["challenger"]["requests"]
    de = harm["agreement"]["delta_e"]
    # measured once per shadow call (one-step harmonizers barely change colours: ΔE ≈ 0 here; its values are
    # tested in test_rollout_rules.py)
    assert de["n"] == harm["arms"]["challenger"]["requests"] and de["mean"] >= 0
    seg = doc["rollout"]["segmentation"]
    arms = seg["arms"]
    assert arms["champion"]["requests"] + arms["challenger"]["requests"] >= 24 + 12
    assert arms["champion"]["version"] == "v1" and arms["challenger"]["version"] == "v2"
    q = seg["quality"]["foreground_fraction"]  # the no-reference quality features, tested per arm
    assert sum(q["n"]) >= 36 and q["p_value"] is not None and isinstance(q["significant"], bool)
    assert seg["latency"]["n"][0] == arms["champion"]["requests"] and seg["verdict"] in ("promote", "rollback")
    assert set(seg["drift"]) == {"champion", "challenger"}
    states = {"none", "off", "pending", "stored", "computed", "unavailable"}  # each arm's drift reference
    assert set(seg["reference"]) == {"champion", "challenger"} and set(seg["reference"].values()) <= states
    assert doc["models"]["segmentation"]["arm"] == "champion"

    assert main(["rollout", "status", "segmentation", "--url", url]) == 0
    out = capsys.readouterr().out
    assert "challenger  v2" in out and "verdict:" in out and "quality foreground_fraction" in out

    # the same split on Ray's metrics port (what Prometheus scrapes), each series labelled by arm
    def total(samples: list, name: str, **labels: str) -> float:
        want = {"application": "montage", **labels}
        return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in want.items()))

    def exported() -> bool:
        s = scrape(app["metrics_port"])
        return (
            total(s, "ray_montage_arm_requests_total", model="segmentation", arm="challenger", version="v2")
            >= arms["challenger"]["requests"]
            and total(s, "ray_montage_arm_requests_total", model="segmentation", arm="champion", version="v1")
            >= arms["champion"]["requests"]
            and total(s, "ray_montage_arm_latency_ms_count", model="segmentation", arm="challenger") >= 1
            and total(s, "ray_montage_shadow_agreement_count", model="harmonization", metric="delta_e") >= de["n"]
            and total(s, "ray_montage_images_total", model="segmentation", arm="challenger", version="v2") >= 1
            and total(s, "ray_montage_images_total", model="harmonization", arm="challenger") >= de["n"]
        )

    wait_until(exported, 60, "the arm-labelled series on Ray's metrics port")


def test_reload_onto_models_that_do_not_load_keeps_serving(app, caplog) -> None:
    from montage.cli import main
    from montage.serve.app import ReloadError, load_serve_config, run

    url, garbage = app["url"], app["tmp"] / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    codes: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            codes.append(requests.post(f"{url}/v1/segment", files={"image": png(img(24, 24))}, timeout=60).status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        with pytest.raises(ReloadError, match="Harmonizer: .*garbage.pt failed to load"):
            run(load_serve_config(None, app["overrides"] + [f"harmonization.source={garbage}"]))
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "degraded" and "garbage.pt" in health["reload_errors"]["harmonization"]["source"]
        assert health["models"]["harmonization"] == app["ck"]["harm1"]  # the previous version still serves
        # another task's model, through the CLI: exit 1 and the reason
        wrong = app["overrides"] + [f"segmentation.source={app['ck']['harm1']}"]
        assert main(["serve", "--reload", *wrong]) == 1
        assert "Segmenter" in caplog.text and "still serving" in caplog.text
        assert "v1" in requests.get(f"{url}/healthz", timeout=30).json()["models"]["segmentation"]
    finally:
        stop.set()
        t.join()
    assert len(codes) >= 3 and set(codes) == {200}  # no request failed during the failed reloads
    run(load_serve_config(None, app["overrides"]))
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


def test_autoscaling_in_serve_yaml_reaches_the_deployments(app) -> None:
    """``<model>.autoscaling`` in a serve.yaml becomes Serve's ``autoscaling_config`` of both arms'
    deployments (in place of ``num_replicas``); a section without it keeps its fixed replicas."""
    import yaml
    from ray.serve.context import _get_global_client

    from montage.serve.app import load_serve_config, run

    want = {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 60.0,
    }
    path = app["tmp"] / "serve-autoscaling.yaml"
    path.write_text(yaml.safe_dump({"segmentation": {"autoscaling": {"enabled": True, **want}}}))
    run(load_serve_config(path, app["overrides"]))
    try:
        deployments = _get_global_client().get_serve_details()["applications"]["montage"]["deployments"]
        for name in ("Segmenter", "SegmenterChallenger"):
            auto = deployments[name]["deployment_config"]["autoscaling_config"]
            assert {k: auto[k] for k in want} == want, name
        assert deployments["Harmonizer"]["deployment_config"].get("autoscaling_config") is None
        assert deployments["Harmonizer"]["deployment_config"]["num_replicas"] == 1
        r = requests.post(f"{app['url']}/v1/segment", files={"image": png(img(30, 30))}, timeout=60)
        assert r.status_code == 200
    finally:
        run(load_serve_config(None, app["overrides"]))


def _champions(headers: list[str]) -> set[str]:
    """The champion versions among ``X-Montage-Model-Version`` headers of /v1/segment answers."""
    return {h.split("; ")[0].removeprefix("segmentation=") for h in headers if h.endswith("arm=champion")}


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_good_reload_under_load_fails_no_request(app, replicas: int) -> None:
    """The champion moves v1 → v2 → v1 (sources given as a version, then the alias) while two clients keep
    calling: every request is answered 200, and every request started after a reload returned is
    answered by the new version, with one Segmenter replica and with two."""
    from montage.serve.app import load_serve_config, run

    over = app["overrides"] + [f"segmentation.num_replicas={replicas}"]
    run(load_serve_config(None, over))  # scaling up is not what is measured
    try:
        with Load(app["url"]) as load:
            load.wait_for(4)
            run(load_serve_config(None, over + [f"segmentation.source=models:/{SEG}/2"]))
            moved = time.monotonic()
            load.wait_for(12, since=moved)
            moving_back = time.monotonic()
            run(load_serve_config(None, over))
            back = time.monotonic()
            load.wait_for(12, since=back)
        codes = [code for _, code, _ in load.calls]
        assert len(codes) >= 28 and set(codes) == {200}, [c for c in load.calls if c[1] != 200][:3]
        assert _champions([v for t, _, v in load.calls if moved < t < moving_back]) == {"v2"}
        assert _champions(load.answered_since(back)) == {"v1"}
    finally:
        # two replicas stay for the next test, which runs with two (scaling down and up again would stop and
        # start a replica process); it restores the app's overrides
        run(load_serve_config(None, over if replicas == 2 else app["overrides"]))


def test_a_failed_reload_keeps_both_replicas_serving(app, caplog) -> None:
    """``montage serve --reload`` onto a checkpoint of random bytes with two Segmenter replicas: exit 1
    naming the deployment, the file and the reason; both replicas keep answering with v1 (no request
    fails), and /healthz says the reload failed."""
    from ray import serve

    from montage.cli import main
    from montage.serve.app import load_serve_config, run

    url, garbage = app["url"], app["tmp"] / "garbage-2.pt"
    garbage.write_bytes(np.random.default_rng(1).bytes(8192))
    over = app["overrides"] + ["segmentation.num_replicas=2"]
    run(load_serve_config(None, over))  # already so after the previous test
    try:
        with Load(url) as load:
            load.wait_for(4)
            assert main(["serve", "--reload", *over, f"segmentation.source={garbage}"]) == 1
            failed = time.monotonic()
            load.wait_for(16, since=failed)
        assert f"Segmenter: {garbage} failed to load (CheckpointError: cannot read checkpoint" in caplog.text
        assert "still serving montage-segmentation v1 (@champion)" in caplog.text
        assert {code for _, code, _ in load.calls} == {200}
        assert _champions(load.answered_since(0)) == {"v1"}
        handle = serve.get_deployment_handle("Segmenter", "montage")
        states = [handle.status.remote().result(timeout_s=30) for _ in range(12)]  # both replicas, by chance
        assert all(s["version"] == "v1" and str(garbage) == s["reload_error"]["source"] for s in states)
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "degraded" and "CheckpointError" in health["reload_errors"]["segmentation"]["error"]
    finally:
        run(load_serve_config(None, app["overrides"]))
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"


def test_a_version_whose_artifact_is_gone_keeps_the_champion_serving(app) -> None:
    """A registered version whose artifacts were deleted from the store: the reload fails naming it, v1 serves."""
    import shutil

    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.serve.app import ReloadError, load_serve_config, run
    from montage.tracking import registry as reg
    from montage.tracking.runs import create_run

    url, uri, tmp = app["url"], app["uri"], app["tmp"]
    base = load_config(
        "segmentation",
        TASKS.get("segmentation").spec,
        packaged_config("segmentation-smoke"),
        [f"tracking.uri={uri}", f"tracking.artifacts={tmp / 'artifacts'}"],
    )
    version = reg.register_checkpoint(
        base, app["ck"]["seg2"], create_run(base), "val/iou", "max", 0.1, "manual", {}, "never"
    ).version
    mv = reg.client(uri).get_model_version(SEG, version)
    stored = reg.client(uri).get_logged_model(mv.model_id).artifact_location if mv.model_id else mv.source
    assert stored.startswith(("file://", "/")), stored  # the module's store is a local folder
    shutil.rmtree(stored.removeprefix("file://"))
    try:
        with pytest.raises(ReloadError, match=f"Segmenter: models:/{SEG}/{version} failed to load") as err:
            run(load_serve_config(None, app["overrides"] + [f"segmentation.source=models:/{SEG}/{version}"]))
        assert f"artifacts cannot be fetched from {stored}: No such artifact" in str(err.value)
        assert "still serving montage-segmentation v1" in str(err.value)
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "degraded" and health["reload_errors"]["segmentation"]["revision"] == version
        r = requests.post(f"{url}/v1/segment", files={"image": png(img(30, 30))}, timeout=60)
        assert r.status_code == 200 and _champions([r.headers["x-montage-model-version"]]) <= {"v1"}
    finally:
        run(load_serve_config(None, app["overrides"]))


def _shadowed(app, over: list[str], n: int = 3) -> dict:
    """Reload with ``over``, send ``n`` harmonizations (shadow: the champion answers), and return
    /v1/monitor's harmonization side once the challenger has run on them."""
    from montage.serve.app import load_serve_config, run

    url = app["url"]
    run(load_serve_config(None, app["overrides"] + over))
    comp, mask = img(40, 40, 8), np.zeros((40, 40), np.uint8)
    mask[6:34, 8:30] = 255
    for _ in range(n):
        r = requests.post(f"{url}/v1/harmonize", files={"composite": png(comp), "mask": png(mask)}, timeout=60)
        assert r.status_code == 200 and _versions(r)["harmonization"][1] == "champion"
    end = time.monotonic() + 30
    while True:
        side = requests.get(f"{url}/v1/monitor", timeout=30).json()["rollout"]["harmonization"]
        ran = side["arms"]["challenger"]["requests"]
        if ran >= n or time.monotonic() > end:
            return side
        time.sleep(0.3)


def test_the_challengers_runtime_follows_its_source(app) -> None:
    """An exported .onnx challenger runs in ONNX Runtime beside the PyTorch champion (the section names
    no runtime); a remote checkpoint (``file://``, fetched by pyarrow like ``s3://``) runs in PyTorch."""
    from montage.platform.inference import load_onnx_predictor, load_predictor
    from montage.serve.app import load_serve_config, run
    from montage.tracking.variants import export_model

    url, ck, tmp = app["url"], app["ck"], app["tmp"]
    onnx = export_model("harmonization", ck["harm2"], tmp / "harm2.onnx", dynamic_batch=True, register=False)
    comp, mask = img(40, 40, 8), np.zeros((40, 40), np.uint8)
    mask[6:34, 8:30] = 255
    # the file serves like its parent: the ONNX predictor answers what the PyTorch one does
    ours = load_onnx_predictor(onnx.report.path, ck["harm2"], task="harmonization")([comp], [mask])[0]
    torch_answer = load_predictor(ck["harm2"], task="harmonization")([comp], [mask])[0]
    assert np.abs(ours.astype(int) - torch_answer.astype(int)).max() <= 1
    try:
        side = _shadowed(app, [f"harmonization.challenger={onnx.report.path}"])
        assert side["arms"]["challenger"] == {**side["arms"]["challenger"], "version": "harm2.onnx-onnx", "errors": 0}
        assert side["arms"]["challenger"]["requests"] == 3 and side["agreement"]["delta_e"]["n"] == 3
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "ok" and "harm2.onnx (onnx of " in health["challengers"]["harmonization"]
        assert health["models"]["harmonization"] == ck["harm1"]  # the champion still runs its checkpoint

        remote = f"file://{Path(ck['harm2']).resolve()}"
        side = _shadowed(app, [f"harmonization.challenger={remote}"])
        assert side["arms"]["challenger"]["requests"] == 3 and side["arms"]["challenger"]["errors"] == 0
        assert side["arms"]["challenger"]["version"] == Path(ck["harm2"]).name  # a torch series: no suffix
    finally:
        run(load_serve_config(None, app["overrides"]))


def test_rollback_and_promote_through_the_registry(app) -> None:
    from montage.cli import main
    from montage.serve.app import load_serve_config, run
    from montage.tracking import registry as reg

    url, uri, over = app["url"], app["uri"], app["overrides"]
    mlc = reg.client(uri)
    assert main(["rollout", "rollback", "segmentation", "--url", url, *over]) == 0
    assert mlc.get_model_version(SEG, "2").tags[schema.ROLLOUT] == "rolled-back"
    assert "challenger" not in mlc.get_registered_model(SEG).aliases  # the alias is gone ...
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert "segmentation" not in health.get("challengers", {})  # ... so the reload dropped the arm
    assert "segmentation" not in requests.get(f"{url}/v1/monitor", timeout=30).json()["rollout"]

    mlc.set_registered_model_alias(SEG, "challenger", "2")  # a new rollout of v2
    run(load_serve_config(None, over))
    assert main(["rollout", "promote", "segmentation", "--url", url, "--force", *over]) == 0
    assert str(mlc.get_model_version_by_alias(SEG, "champion").version) == "2"
    assert mlc.get_model_version(SEG, "1").tags[schema.ROLLOUT] == "replaced"
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert "v2" in health["models"]["segmentation"] and "segmentation" not in health.get("challengers", {})
    r = requests.post(f"{url}/v1/segment", files={"image": png(img(30, 30))}, timeout=60)
    assert _versions(r)["segmentation"] == ("v2", "champion")


def test_fused_mode_routes_the_same_arms(app) -> None:
    """``fused: true``: both arms run inside the ingress replica, routed and reported the same way
    (last: the application stays fused; after the promotion above, v1 comes back as the challenger)."""
    from montage.serve.app import load_serve_config, run
    from montage.tracking import registry as reg

    url = app["url"]
    reg.client(app["uri"]).set_registered_model_alias(SEG, "challenger", "1")
    run(load_serve_config(None, app["overrides"] + ["fused=true"]))
    answered = {}
    for client in range(12):
        r = requests.post(
            f"{url}/v1/segment",
            files={"image": png(img(32, 32))},
            headers={"X-Montage-Client": f"u{client}"},
            timeout=60,
        )
        assert r.status_code == 200
        answered[f"u{client}"] = _versions(r)["segmentation"]
    assert {a for _, a in answered.values()} == {"champion", "challenger"}
    assert {v for v, a in answered.values() if a == "challenger"} == {"v1"}
    assert {v for v, a in answered.values() if a == "champion"} == {"v2"}
    side = requests.get(f"{url}/v1/monitor", timeout=30).json()["rollout"]["segmentation"]
    assert side["arms"]["champion"]["requests"] + side["arms"]["challenger"]["requests"] == 12
