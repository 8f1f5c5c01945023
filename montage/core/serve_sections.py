"""serve.yaml (``montage serve --config F``) as dataclasses: the application, each model section
(with its challenger and rollout), replica autoscaling, monitoring, access. Pure data and
validation, loaded by :func:`load_serve_config`; the Serve code that acts on them is
:mod:`montage.serve` (access, monitoring, rollout, graph, app)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from montage.core.config import load_file
from montage.core.sources import ModelSource


@dataclass
class AuthConfig:
    api_keys_file: str = (
        ""  # one key hash a line: `sha256:<64 hex>` (from `montage serve keygen`); '#' starts a comment
    )
    api_keys_env: str = (
        ""  # the NAME of an environment variable holding keys (comma or space separated), e.g. MONTAGE_API_KEYS
    )


@dataclass
class CorsConfig:
    allow_origins: list[str] = field(default_factory=list)  # e.g. [https://tools.example.com]; empty: no CORS headers


@dataclass
class MonitoringConfig:
    """``monitoring:`` in serve.yaml."""

    enabled: bool = True  # metrics, windows and drift; off: nothing is recorded
    window: int = 500  # live requests kept per model for drift, and per endpoint/stage for /v1/monitor
    min_samples: int = 50  # drift is judged once the window holds this many requests
    check_every: int = 10  # re-evaluate drift every N requests
    psi_threshold: float = 0.25  # population stability index at which a feature counts as drifted ...
    ks_pvalue: float = 0.01  # ... when the two-sample KS test also rejects equality at this p-value
    reference_samples: int = 256  # training samples for a reference computed on the fly (versions without one)


MODES = ("canary", "shadow")
RUNTIMES = ("", "torch", "onnx", "openvino")


@dataclass
class RolloutRules:
    """``<model>.rollout.rules``: when the challenger is promoted or rolled back."""

    auto: bool = False  # act on the verdict by itself (else `montage rollout promote|rollback` does)
    min_requests: int = 200  # per arm before any verdict but "collecting"
    max_p95_ratio: float = 1.5  # challenger p95 / champion p95 (model-call latency) past this: rollback
    max_error_rate_increase: float = 0.01  # challenger error rate − champion's, when significant: rollback
    max_quality_shift: float = 0.3  # |rank-biserial effect| of a quality feature, when significant: rollback
    min_shadow_agreement: float = 0.8  # mean alpha IoU (segmentation) in shadow mode below this: rollback
    max_shadow_delta_e: float = 5.0  # mean ΔE in the mask (harmonization) in shadow mode past this: rollback
    significance: float = 0.05  # the tests' level


@dataclass
class RolloutConfig:
    """``<model>.rollout`` in serve.yaml (used when ``<model>.challenger`` is set)."""

    mode: str = "canary"  # canary | shadow
    traffic: float = 0.1  # canary: the share of callers the challenger answers
    client_header: str = "X-Montage-Client"  # sticky key of a caller without an API key
    window: int = 2000  # requests kept per arm for the comparison
    rules: RolloutRules = field(default_factory=RolloutRules)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"rollout.mode: unknown '{self.mode}'; valid: {', '.join(MODES)}")
        if not 0 <= self.traffic <= 1:
            raise ValueError(f"rollout.traffic must be in [0, 1], got {self.traffic}")


@dataclass
class AutoscalingServeConfig:
    """``<model>.autoscaling``: Serve's replica autoscaling (on: ``num_replicas`` is ignored)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0  # per replica; keep below max_ongoing_requests
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def options(self) -> dict[str, Any]:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"autoscaling: need 0 <= min_replicas <= max_replicas >= 1, got {self}")
        return {
            "autoscaling_config": {
                k: getattr(self, k)
                for k in (
                    "min_replicas",
                    "max_replicas",
                    "target_ongoing_requests",
                    "upscale_delay_s",
                    "downscale_delay_s",
                )
            }
        }


@dataclass
class ModelServeConfig:
    # models:/montage-<task>@champion (default), models:/<name>/<version>, a checkpoint (path or s3://…), an .onnx
    # file, an OpenVINO IR .xml file
    source: str = ""
    # torch | onnx | openvino (an .onnx file or registered ONNX variant, run by ONNX Runtime or OpenVINO; an IR or
    # registered OpenVINO variant, run by OpenVINO); empty: what the source is (onnx for an .onnx file or a version
    # tagged montage.runtime=onnxruntime, openvino for an .xml file or a version tagged montage.runtime=openvino,
    # else torch)
    runtime: str = ""
    enabled: bool = True
    num_replicas: int = 1
    num_cpus: float = 0.25  # small by default: ingress + three models fit a 2-core laptop
    num_gpus: float = 0.0  # fractional GPUs allowed
    max_batch_size: int = 8
    # how long @serve.batch waits for more requests: a lone request waited the whole 10 ms at each model
    # before; under load a batch forms anyway from what queued during the previous forward (GPUs may want a few ms)
    batch_wait_timeout_s: float = 0.0
    threads: int = 0  # torch intra-op threads in a replica; 0: what Ray sets from num_cpus (1 for a fractional CPU)
    max_ongoing_requests: int = 16  # per replica; keep >= max_batch_size so batches can fill
    max_queued_requests: int = (
        64  # per caller (the ingress); past it the ingress answers 503 + Retry-After; -1: unbounded
    )
    # a second source answering beside `source` (canary) or measured on a copy of the requests (shadow);
    # a registry alias that does not exist (e.g. models:/montage-segmentation@challenger after a promotion) means none
    challenger: str = ""
    challenger_runtime: str = ""  # the challenger's runtime, as `runtime` is the source's (empty: what it is)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    autoscaling: AutoscalingServeConfig = field(default_factory=AutoscalingServeConfig)

    def __post_init__(self) -> None:
        self.arm_source("", "challenger")  # a source that is none of the forms fails here, naming the key
        if self.source:
            ModelSource.parse(self.source, "source")
        for key in ("runtime", "challenger_runtime"):
            if getattr(self, key) not in RUNTIMES:
                valid = ", ".join(r or "'' (the source's)" for r in RUNTIMES)
                raise ValueError(f"{key}: unknown '{getattr(self, key)}'; valid: {valid}")

    def arm_source(self, task: str, arm: str = "champion") -> ModelSource | None:
        """The source of an arm: the champion's (default ``models:/montage-<task>@champion``) or the
        challenger's (None when unset)."""
        if arm == "challenger":
            return ModelSource.parse(self.challenger, "challenger") if self.challenger else None
        return ModelSource.parse(self.source, "source") if self.source else ModelSource.champion(task)


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
    ingress_max_ongoing_requests: int = 32  # per ingress replica
    ingress_max_queued_requests: int = (
        128  # at the HTTP proxy; past it the proxy answers 503 (plain text) + Retry-After; -1: unbounded
    )
    retry_after_s: float = 1.0  # the Retry-After of every backpressure 503
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    name: str = "montage"
    # run the models inside the ingress replica: no deployment-handle hop (lowest latency at low load),
    # but no model replicas of their own (they scale and queue with the ingress)
    fused: bool = False
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """Defaults → serve.yaml ``path`` (none: the defaults alone) → ``key=value`` ``overrides``, validated."""
    return load_file(ServeConfig, path or None, overrides)
