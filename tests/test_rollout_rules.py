"""Champion vs challenger without Ray: agreement measures, significance tests, sticky routing,
the verdict and the automatic decision (montage.serve.compare, montage.serve.rollout)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from stores import mlflow_store

from montage.serve import compare
from montage.serve.rollout import _CALL, Arms, RolloutConfig, RolloutRules, bucket, caller_key, verdict


def test_alpha_agreement_and_delta_e() -> None:
    a = np.zeros((64, 64), np.uint8)
    a[16:48, 16:48] = 255
    same = compare.alpha_agreement(a, a)
    assert same == {"alpha_iou": 1.0, "band_sad": 0.0}
    shifted = np.roll(a, 4, axis=1)
    s = compare.alpha_agreement(a, shifted)
    assert abs(s["alpha_iou"] - 28 / 36) < 1e-6  # 32×28 shared of 32×36
    assert s["band_sad"] > 0.1  # the disagreement lies in the band, where it is measured
    img = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    assert compare.delta_e(img, img, mask)["delta_e"] == 0.0
    brighter = img.copy()
    brighter[mask == 0] = 0  # outside the mask: ignored
    assert compare.delta_e(img, brighter, mask)["delta_e"] == 0.0
    grey = np.full_like(img, 128)
    assert compare.delta_e(img, grey, mask)["delta_e"] > 10
    assert compare.delta_e(img, grey, np.zeros_like(mask))["delta_e"] == 0.0


def test_compare_samples_says_when_a_difference_is_significant() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(10, 1, 300)
    same = compare.compare_samples(base, rng.normal(10, 1, 300))
    shifted = compare.compare_samples(base, rng.normal(10.5, 1, 300))
    small = compare.compare_samples(base[:8], rng.normal(10.5, 1, 8))
    assert not same["significant"] and shifted["significant"] and not small["significant"]
    assert shifted["effect"] > 0.15 and shifted["median_diff_ci"][0] > 0  # challenger larger, CI above 0
    assert compare.compare_samples([1, 2], [3])["p_value"] is None  # too few to test
    errs = compare.error_rates((2, 1000), (40, 1000))
    assert errs["significant"] and not compare.error_rates((2, 1000), (3, 1000))["significant"]
    ci = compare.p95_ratio_ci(base, base * 2)
    assert 1.7 < ci[0] <= ci[1] < 2.3


def test_sticky_assignment_by_key_or_client_header() -> None:
    scope = {"headers": [(b"authorization", b"Bearer k1"), (b"x-montage-client", b"c")]}
    assert caller_key(scope) == "key:Bearer k1"
    assert caller_key({"headers": [(b"x-montage-client", b"c")]}) == "client:c"
    assert caller_key({"headers": []}) == ""
    shares = [bucket(f"client:{i}", "v2") for i in range(4000)]
    assert abs(np.mean(np.array(shares) < 0.1) - 0.1) < 0.02  # about `traffic` of the callers
    assert bucket("client:7", "v2") == bucket("client:7", "v2") != bucket("client:7", "v3")
    with pytest.raises(ValueError, match="rollout.mode"):
        RolloutConfig(mode="split")


# The ingress's latency clock in these tests: it moves only when a fake model works, so the latencies the
# arms record are the fakes' own, not how busy the machine is (two identical fakes timed for real once
# differed enough in p95 on a loaded machine to be rolled back)
_NOW = [0.0]


@pytest.fixture(autouse=True)
def _test_clock(monkeypatch) -> None:
    import time
    import types

    import montage.serve.rollout as rollout

    monkeypatch.setattr(rollout, "time", types.SimpleNamespace(perf_counter=lambda: _NOW[0], time=time.time))


class _Fake:
    """A stand-in deployment handle: ``handle.infer.remote(x)`` → (version, f(x)), taking ``ms`` on
    the test clock."""

    def __init__(self, version: str, fn, fail: bool = False, ms: float = 10.0) -> None:
        self.version, self.fn, self.fail, self.ms = version, fn, fail, ms
        self.infer = self

    async def remote(self, *args):
        _NOW[0] += self.ms / 1000
        if self.fail:
            raise RuntimeError("boom")
        return self.version, self.fn(*args)


def _run(arms: Arms, n: int, client: str = "") -> list[str]:
    async def go() -> list[str]:
        out = []
        for i in range(n):
            call = {"scope": {"headers": [(b"x-montage-client", f"{client}{i}".encode())] if client else []}}
            call["answered"] = {}
            token = _CALL.set(call)
            try:
                await arms.call(np.full((8, 8), 200, np.uint8))
            finally:
                _CALL.reset(token)
            out.append(call["answered"][arms.task][1])
            await asyncio.sleep(0)  # let the shadow call run, as a real handle's await would
        await asyncio.sleep(0.05)  # shadow tasks finish
        return out

    return asyncio.run(go())


def test_canary_shadow_verdict_and_automatic_rollback() -> None:
    same = lambda x: x  # noqa: E731
    arms = Arms("segmentation", _Fake("v1", same), _Fake("v2", same))
    arms.configure({"mode": "canary", "traffic": 0.3, "rules": {"min_requests": 20}}, salt="s")
    answered = _run(arms, 400, client="user")
    assert 0.2 < answered.count("challenger") / 400 < 0.4
    doc = arms.compare()
    assert doc["arms"]["challenger"]["version"] == "v2" and doc["verdict"] == "promote"
    # the same challenger three times slower breaks the p95 rule
    arms = Arms("segmentation", _Fake("v1", same), _Fake("v2", same, ms=30.0))
    arms.configure({"mode": "canary", "traffic": 0.3, "rules": {"min_requests": 20}}, salt="s")
    _run(arms, 400, client="user")
    doc = arms.compare()
    assert doc["verdict"] == "rollback" and doc["reasons"] == ["p95 ratio 3.00 > 1.5"], doc["reasons"]

    # shadow: the champion answers everything; the challenger's disagreement is measured and breaks the rule
    arms = Arms("segmentation", _Fake("v1", same), _Fake("v2", lambda x: 255 - x))
    arms.configure({"mode": "shadow", "rules": {"min_requests": 20, "auto": True}}, salt="s")
    assert set(_run(arms, 60)) == {"champion"}
    assert arms.decision is not None and arms.decision["action"] == "rollback" and arms.decision["automatic"]
    assert any("alpha IoU" in r for r in arms.decision["reasons"])
    assert set(_run(arms, 5)) == {"champion"} and not arms.active  # rolled back: no more shadow calls

    # a failing challenger in canary: the champion answers instead, the challenger's errors are counted
    arms = Arms("segmentation", _Fake("v1", same), _Fake("v2", same, fail=True))
    arms.configure({"mode": "canary", "traffic": 1.0, "rules": {"min_requests": 10}}, salt="s")
    assert set(_run(arms, 30)) == {"champion"}
    doc = arms.compare()
    assert doc["errors"]["rate"][1] == 1.0 and doc["verdict"] == "rollback"
    assert verdict(doc, RolloutRules(min_requests=1000))[0] == "collecting"


def test_the_registry_step_of_a_decision(tmp_path) -> None:
    """``registry_step``: promote moves ``@champion`` to the challenger's version and drops ``@challenger``,
    rollback drops ``@challenger`` only, both tag the versions (in a thread: the request does not wait);
    a checkpoint challenger moves nothing, and a registry failure is reported in the decision."""
    import time

    import mlflow

    from montage.core import schema
    from montage.serve.rollout import registry_step

    uri = mlflow_store(tmp_path, "reg.db")
    mlc = mlflow.MlflowClient(tracking_uri=uri)
    for name in ("montage-segmentation", "montage-harmonization"):
        mlc.create_registered_model(name)
        for _ in range(2):
            mlc.create_model_version(name, source=str(tmp_path))
        mlc.set_registered_model_alias(name, "champion", "1")
        mlc.set_registered_model_alias(name, "challenger", "2")

    def decide(task: str, action: str, spec: dict) -> dict:
        arms = Arms(task, _Fake("v1", None), _Fake("v2", None))
        arms.on_decision = registry_step({"tracking_uri": uri, **spec})
        arms.decide(action, ["p95 ratio 2.10 > 1.5"], automatic=True)
        end = time.monotonic() + 30
        while not {"registry", "registry_error"} & set(arms.decision) and time.monotonic() < end:
            time.sleep(0.05)
        return arms.decision

    seg = {"source": "models:/montage-segmentation@challenger", "version": "2"}
    assert decide("segmentation", "promote", seg)["registry"] == "promoted version 2"
    aliases = mlc.get_registered_model("montage-segmentation").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "2"}
    assert mlc.get_model_version("montage-segmentation", "2").tags[schema.ROLLOUT] == "promoted"
    assert mlc.get_model_version("montage-segmentation", "2").tags[schema.ROLLOUT_REASON] == "p95 ratio 2.10 > 1.5"
    assert mlc.get_model_version("montage-segmentation", "1").tags[schema.ROLLOUT] == "replaced"

    harm = {"source": "models:/montage-harmonization@challenger", "version": "2"}
    assert decide("harmonization", "rollback", harm)["registry"] == "rolled back version 2"
    assert {k: str(v) for k, v in mlc.get_registered_model("montage-harmonization").aliases.items()} == {
        "champion": "1"
    }
    assert mlc.get_model_version("montage-harmonization", "2").tags[schema.ROLLOUT] == "rolled-back"

    checkpoint = Arms("segmentation", _Fake("v1", None), _Fake("v2", None))
    checkpoint.on_decision = registry_step({"source": str(tmp_path / "best.pt"), "version": "17", "tracking_uri": uri})
    checkpoint.decide("rollback", [])
    time.sleep(0.2)
    assert not {"registry", "registry_error"} & set(checkpoint.decision)  # nothing to move

    missing = {"source": "models:/montage-pix2pix@challenger", "version": "3"}
    assert "montage-pix2pix not found" in decide("pix2pix", "promote", missing)["registry_error"]
