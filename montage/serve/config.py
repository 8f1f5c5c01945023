"""serve.yaml as dataclasses: the application, each model section (with its challenger and
rollout), replica autoscaling, monitoring, access."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from montage.core.config import from_dict, merge, parse_override, read_yaml, set_dotted, to_dict
from montage.serve.access import AuthConfig, CorsConfig
from montage.serve.monitoring import MonitoringConfig
from montage.serve.rollout import RolloutConfig


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
    source: str = ""  # models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint path
    # torch | onnx | openvino (a registered ONNX variant from `montage export`, run by ONNX Runtime or OpenVINO)
    runtime: str = "torch"
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
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    autoscaling: AutoscalingServeConfig = field(default_factory=AutoscalingServeConfig)


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
    tree = to_dict(ServeConfig())
    if path:
        tree = merge(tree, read_yaml(path))
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    return from_dict(ServeConfig, tree)
