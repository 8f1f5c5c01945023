"""Champion and challenger of one model, side by side in the ingress.

A model section of serve.yaml may name a ``challenger`` source and a ``rollout``:

- ``mode: canary``: a share ``traffic`` of callers is answered by the challenger. Assignment is
  sticky per caller (a hash of the API key, else of the ``client_header``), random per request
  for an anonymous caller.
- ``mode: shadow``: the champion answers; the challenger runs on the same input after the
  answer is sent and its output is only compared with the champion's (:mod:`montage.serve.compare`).

Every answered model call records which version and arm answered; :class:`VersionHeaders` puts
them on the response (``X-Montage-Model-Version: segmentation=v7; arm=challenger``, one per
model stage). :class:`Arms` keeps each arm's windows (latency, errors, shadow agreement) and
judges them with :func:`verdict` against the :class:`RolloutRules`.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import random
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from montage.core.serve_sections import RolloutConfig, RolloutRules
from montage.serve import compare
from montage.serve.monitoring import _percentiles

log = logging.getLogger("montage.serve")

ARMS = ("champion", "challenger")
HEADER = "X-Montage-Model-Version"


# -- per request: who calls, and which versions answered ----------------------------------------

_CALL: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("montage_rollout", default=None)


def caller_key(scope: dict[str, Any], client_header: str = "X-Montage-Client") -> str:
    """The sticky key of a request: its bearer API key, else its client header, else "" (anonymous)."""
    want = client_header.lower().encode()
    auth = client = ""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            auth = value.decode("latin-1").strip()
        elif name == want:
            client = value.decode("latin-1").strip()
    return f"key:{auth}" if auth else (f"client:{client}" if client else "")


def bucket(key: str, salt: str) -> float:
    """A caller's fixed place in [0, 1) for one model (a new ``salt``, i.e. a new challenger, reshuffles)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class VersionHeaders:
    """ASGI middleware: the request's caller headers for :meth:`Arms.pick`, and one
    ``X-Montage-Model-Version`` header per model stage that answered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        call: dict[str, Any] = {"scope": scope, "answered": {}}
        token = _CALL.set(call)

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and call["answered"]:
                headers = list(message.get("headers", []))
                for task, (version, arm) in call["answered"].items():
                    headers.append((HEADER.lower().encode(), f"{task}={version}; arm={arm}".encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            _CALL.reset(token)


def answered() -> dict[str, dict[str, str]]:
    """The versions that answered the current request so far (for ``?return=layers``)."""
    call = _CALL.get()
    return {t: {"version": v, "arm": a} for t, (v, a) in (call["answered"] if call else {}).items()}


# -- the two arms of one model -------------------------------------------------------------------


class _Window:
    def __init__(self, size: int) -> None:
        self.latency: deque[float] = deque(maxlen=size)  # ms of answered calls
        self.outcomes: deque[int] = deque(maxlen=size)  # 1: the call failed
        self.agreement: dict[str, deque[float]] = {}
        self.version = ""

    def add(self, ms: float, failed: bool, version: str = "") -> None:
        if not failed:
            self.latency.append(ms)
        self.outcomes.append(int(failed))
        self.version = version or self.version


class Arms:
    """Champion and (optionally) challenger handles of one model, routed by the rollout config."""

    def __init__(self, task: str, champion: Any, challenger: Any = None) -> None:
        self.task, self.champion, self.challenger = task, champion, challenger
        self.cfg = RolloutConfig()
        self.salt = ""
        self.decision: dict[str, Any] | None = None  # {"action", "reasons", "time", ...} once a rule acted
        self.on_decision: Callable[[Arms, str, list[str]], None] | None = None
        self.windows = {arm: _Window(self.cfg.window) for arm in ARMS}
        self._shadows: set[asyncio.Task] = set()
        self._checked = 0
        self._metrics = None

    def configure(self, cfg: dict[str, Any] | RolloutConfig | None, salt: str = "") -> None:
        from montage.core.config import from_dict

        new = cfg if isinstance(cfg, RolloutConfig) else from_dict(RolloutConfig, cfg or {}, f"{self.task}.rollout")
        if salt != self.salt or new.window != self.cfg.window:  # another challenger: start over
            self.windows = {arm: _Window(new.window) for arm in ARMS}
            self.decision = None
        self.cfg, self.salt = new, salt

    @property
    def active(self) -> bool:
        """Whether the challenger takes part (set, and not rolled back or promoted)."""
        return self.challenger is not None and self.decision is None

    def pick(self) -> str:
        """The arm that answers this request."""
        if not self.active or self.cfg.mode == "shadow":
            return "champion" if self.decision is None or self.decision["action"] != "promote" else "challenger"
        call = _CALL.get()
        key = caller_key(call["scope"], self.cfg.client_header) if call else ""
        u = bucket(key, self.salt) if key else random.random()
        return "challenger" if u < self.cfg.traffic else "champion"

    async def call(self, *args: Any) -> Any:
        """Run the model on the arm this request belongs to; shadow mode also starts the challenger
        on the same input, compared with the answer once both are there."""
        arm = self.pick()
        handle = self.challenger if arm == "challenger" else self.champion
        try:
            version, out = await self._timed(arm, handle, args)
        except Exception:
            if arm != "challenger" or self.decision is not None:
                raise
            arm = "champion"  # a failing challenger costs the caller nothing: the champion answers
            version, out = await self._timed(arm, self.champion, args)
        call = _CALL.get()
        if call is not None:
            call["answered"][self.task] = (version, arm)
        if self.active and self.cfg.mode == "shadow":
            t = asyncio.get_running_loop().create_task(self._shadow(args, out))
            self._shadows.add(t)
            t.add_done_callback(self._shadows.discard)
        self._maybe_decide()
        return out

    async def _timed(self, arm: str, handle: Any, args: tuple) -> tuple[str, Any]:
        t0 = time.perf_counter()
        try:
            version, out = await handle.infer.remote(*args)
        except Exception:
            self._record(arm, (time.perf_counter() - t0) * 1000, True)
            raise
        self._record(arm, (time.perf_counter() - t0) * 1000, False, version)
        return version, out

    async def _shadow(self, args: tuple, answer: Any) -> None:
        try:
            _, out = await self._timed("challenger", self.challenger, args)
        except Exception as exc:  # noqa: BLE001 - counted as the challenger's error; the caller has its answer
            log.debug("%s shadow call failed: %r", self.task, exc)
            return
        try:
            if self.task == "segmentation":
                scores = compare.alpha_agreement(answer, out)
            elif self.task == "harmonization":
                scores = compare.delta_e(answer, out, args[1])
            else:
                scores = {"mean_abs_diff": float(np.abs(np.asarray(answer, np.float32) - out).mean()) / 255}
        except Exception as exc:  # noqa: BLE001 - monitoring never fails anything
            log.warning("%s shadow comparison skipped: %r", self.task, exc)
            return
        w = self.windows["challenger"]
        for k, v in scores.items():
            w.agreement.setdefault(k, deque(maxlen=self.cfg.window)).append(v)
            m = self._m()
            if m is not None:
                m["agreement"].observe(v, tags={"model": self.task, "metric": k})

    def _record(self, arm: str, ms: float, failed: bool, version: str = "") -> None:
        self.windows[arm].add(ms, failed, version)
        m = self._m()
        if m is not None:
            tags = {"model": self.task, "arm": arm, "version": version or self.windows[arm].version}
            m["requests"].inc(tags={**tags, "outcome": "error" if failed else "ok"})
            if not failed:
                m["latency"].observe(ms, tags=tags)

    def _m(self) -> dict[str, Any] | None:
        if self._metrics is None:
            try:
                self._metrics = _arm_metrics()
            except Exception:  # noqa: BLE001 - outside a Ray worker (unit tests): no series
                self._metrics = {}
        return self._metrics or None

    # -- judging ---------------------------------------------------------------------------------

    def compare(self, quality: dict[str, dict[str, list[float]]] | None = None) -> dict[str, Any]:
        """The side-by-side document of ``/v1/monitor``'s ``rollout.<task>``; ``quality``: each
        arm's recent no-reference quality values (from its deployment's monitor)."""
        c, w = self.cfg, self.windows
        a, b = w["champion"], w["challenger"]
        alpha = c.rules.significance
        doc: dict[str, Any] = {
            "mode": c.mode,
            "traffic": c.traffic if c.mode == "canary" else 0.0,
            "active": self.active,
            "arms": {
                arm: {
                    "version": w[arm].version,
                    "requests": len(w[arm].outcomes),
                    "errors": int(sum(w[arm].outcomes)),
                    "latency_ms": _percentiles(list(w[arm].latency)),
                }
                for arm in ARMS
            },
            "latency": compare.compare_samples(a.latency, b.latency, alpha),
            "p95_ratio_ci": compare.p95_ratio_ci(a.latency, b.latency, alpha),
            "errors": compare.error_rates(
                (sum(a.outcomes), len(a.outcomes)), (sum(b.outcomes), len(b.outcomes)), alpha
            ),
            "quality": {},
            "agreement": {k: compare.mean_ci(v) for k, v in b.agreement.items()},
        }
        qa, qb = (quality or {}).get("champion", {}), (quality or {}).get("challenger", {})
        for name in sorted(set(qa) & set(qb)):
            doc["quality"][name] = compare.compare_samples(qa[name], qb[name], alpha)
        action, reasons = verdict(doc, c.rules)
        doc["verdict"], doc["reasons"] = action, reasons
        doc["decision"] = self.decision
        return doc

    def _maybe_decide(self) -> None:
        """With ``rules.auto``: every 50 answered requests past ``min_requests``, act on the verdict
        (without the quality features, which live in the model replicas; /v1/monitor adds them)."""
        r = self.cfg.rules
        self._checked += 1
        if not (r.auto and self.active) or self._checked % 50:
            return
        if min(len(w.outcomes) for w in self.windows.values()) < r.min_requests:
            return
        self.judge(self.compare())

    def judge(self, doc: dict[str, Any]) -> None:
        """Act on a comparison's verdict when ``rules.auto`` (promote or roll back, once)."""
        if not (self.cfg.rules.auto and self.active) or doc["verdict"] not in ("promote", "rollback"):
            return
        self.decide(doc["verdict"], doc["reasons"], automatic=True)

    def decide(self, action: str, reasons: list[str], automatic: bool = False) -> None:
        """Stop the comparison: ``rollback`` (the champion answers everything) or ``promote`` (the
        challenger does, until a reload makes it the champion deployment)."""
        if action not in ("promote", "rollback"):
            raise ValueError(f"unknown rollout action {action!r}; valid: promote, rollback")
        self.decision = {
            "action": action,
            "automatic": automatic,
            "reasons": reasons,
            "time": time.time(),
            "challenger": self.windows["challenger"].version,
        }
        log.warning(
            "%s rollout: %s the challenger %s (%s)",
            self.task,
            action,
            self.decision["challenger"],
            "; ".join(reasons) or "by request",
        )
        if self.on_decision is not None:
            try:
                self.on_decision(self, action, reasons)
            except Exception as exc:  # noqa: BLE001 - the routing decision stands; the registry step is reported
                log.error("%s rollout: the registry step of %s failed: %r", self.task, action, exc)
                self.decision["registry_error"] = repr(exc)


def verdict(doc: dict[str, Any], rules: RolloutRules) -> tuple[str, list[str]]:
    """``collecting`` (too few requests), ``rollback`` (a rule is broken: the reasons say which),
    ``promote`` (enough requests and none broken) — from a :meth:`Arms.compare` document."""
    arms = doc["arms"]
    n = min(arms["champion"]["requests"], arms["challenger"]["requests"])
    if not doc.get("active", True) and doc.get("decision"):
        return doc["decision"]["action"], list(doc["decision"]["reasons"])
    if n < rules.min_requests:
        return "collecting", [f"{n} of {rules.min_requests} requests per arm"]
    broken = []
    lat = doc["latency"]
    p95a, p95b = lat["p95"]
    if p95a and p95b and p95b / p95a > rules.max_p95_ratio:
        ci = doc.get("p95_ratio_ci")
        if ci is None or ci[0] > 1:  # and the ratio is significantly above 1
            broken.append(f"p95 ratio {p95b / p95a:.2f} > {rules.max_p95_ratio}")
    err = doc["errors"]
    increase = err["rate"][1] - err["rate"][0]
    if increase > rules.max_error_rate_increase and err["significant"]:
        broken.append(f"error rate +{100 * increase:.2f} points (p={err['p_value']})")
    for name, q in doc.get("quality", {}).items():
        if q["significant"] and abs(q["effect"]) > rules.max_quality_shift:
            broken.append(f"quality '{name}' shifted (effect {q['effect']:+.2f}, p={q['p_value']})")
    agreement = doc.get("agreement", {})
    iou = (agreement.get("alpha_iou") or {}).get("mean")
    if iou is not None and iou < rules.min_shadow_agreement:
        broken.append(f"shadow alpha IoU {iou:.3f} < {rules.min_shadow_agreement}")
    de = (agreement.get("delta_e") or {}).get("mean")
    if de is not None and de > rules.max_shadow_delta_e:
        broken.append(f"shadow ΔE {de:.2f} > {rules.max_shadow_delta_e}")
    return ("rollback", broken) if broken else ("promote", [f"{n} requests per arm, no rule broken"])


def _arm_metrics() -> dict[str, Any]:
    from ray.serve.metrics import Counter, Histogram

    from montage.serve.monitoring import LATENCY_MS

    return {
        "requests": Counter(
            "montage_arm_requests",
            description="model calls by arm (champion | challenger) and outcome (ok | error)",
            tag_keys=("model", "arm", "version", "outcome"),
        ),
        "latency": Histogram(
            "montage_arm_latency_ms",
            description="model-call latency seen by the ingress, by arm (ms)",
            boundaries=LATENCY_MS,
            tag_keys=("model", "arm", "version"),
        ),
        "agreement": Histogram(
            "montage_shadow_agreement",
            description="agreement of the challenger with the champion on the same input (shadow mode)",
            boundaries=[0.01, 0.05, 0.1, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1, 2, 5, 10, 20],
            tag_keys=("model", "metric"),
        ),
    }


def registry_step(spec: dict[str, Any]) -> Callable[[Arms, str, list[str]], None]:
    """What a decision does in the registry (``montage.tracking.registry``), for a registry
    challenger: promote moves ``@champion`` to it, rollback removes ``@challenger``. Run in a
    thread: the request that triggered the decision does not wait for MLflow. The deployments
    follow at the next reload; until then the ingress routes by the decision."""
    from montage.core.sources import ModelSource

    source = ModelSource.parse(spec.get("source", ""), "rollout source")
    version, uri = str(spec.get("version", "")), spec.get("tracking_uri", "")

    def step(arms: Arms, action: str, reasons: list[str]) -> None:
        if not source.in_registry or not version:
            log.info("%s rollout: the challenger %s is not a registry version; nothing to move", arms.task, source)
            return
        import threading

        from montage.tracking import registry

        fn = registry.promote_challenger if action == "promote" else registry.retire_challenger

        def work() -> None:
            try:
                fn(source, version, uri, "; ".join(reasons))
                if arms.decision is not None:
                    done = "promoted" if action == "promote" else "rolled back"
                    arms.decision["registry"] = f"{done} version {version}"
            except Exception as exc:  # noqa: BLE001 - reported in /v1/monitor's decision
                log.error("%s rollout: registry %s of version %s failed: %r", arms.task, action, version, exc)
                if arms.decision is not None:
                    arms.decision["registry_error"] = repr(exc)

        threading.Thread(target=work, daemon=True, name=f"rollout-{action}").start()

    return step
