"""A tune config (``tune_configs/*.yaml``, ``montage tune F``) as dataclasses: the task, a base
training config, the search space and the sweep's settings (:class:`TuneConfig`), its ASHA
scheduler and what one trial asks for. Pure data and validation; :mod:`montage.launch.tune`
loads it (the search space is checked against the task's config there) and runs the sweep."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


@dataclass
class SchedulerConfig:
    name: Literal["asha", "none"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_t: int = 0  # 0: the base config's train.epochs


@dataclass
class TrialResources:
    """What one trial's TorchTrainer asks for: ``workers`` DDP workers, each with these CPUs (and
    GPUs when ``gpus``). They replace the base config's ``scaling`` of the same names; the rest of
    ``scaling`` (``max_failures``, ``keep_checkpoints``, ...) stays the base config's (``base.scaling.*``).
    ``train.batch_size`` is per worker here as everywhere: the global batch is ``workers × batch_size``."""

    workers: int = 1
    gpus: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")

    def bundle(self) -> dict[str, float]:
        """One worker's resources."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus else {})}

    def demand(self) -> dict[str, float]:
        """The whole trial's (its own function runs on the head: ``montage.launch.tune.TRIAL_FUNCTION_RESOURCES``)."""
        return {k: v * self.workers for k, v in self.bundle().items()}


@dataclass
class TuneConfig:
    task: str
    base: str  # training config: a YAML path (relative to the tune config) or a shipped config name
    search_space: dict[str, dict] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)  # applied to the base config before the search
    metric: str = ""  # empty: the task's monitored metric (cv/<name>_mean with cv.folds in the base)
    mode: Literal["", "min", "max"] = ""
    num_samples: int = 8
    max_concurrent: int = 0  # 0: as many as the cluster can fit once its autoscaler has grown it
    seed: int = 0
    points_to_evaluate: list[dict] = field(default_factory=list)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: TrialResources = field(default_factory=TrialResources)
    storage: str = "runs/tune"  # local path, NFS mount, s3:// or gs://
    storage_endpoint: str = ""  # S3-compatible server for s3:// storage (as run.storage_endpoint)
    name: str = ""  # empty: <task>-sweep-<timestamp>
    max_failures: int = 0  # retries of a failing trial
    promote: Literal["better", "always", "never"] = "better"

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
