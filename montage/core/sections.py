"""The platform's configuration sections (the task-independent part of every
experiment config); :mod:`montage.core.config` assembles them with a task's own sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimConfig:
    """Optimizer of every network the task trains (a task may add per-network fields)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class SchedConfig:
    """Learning-rate schedule.

    ``cosine_restarts``: CosineAnnealingWarmRestarts(T_0=t0, T_mult=t_mult, eta_min), per epoch.
    ``linear_decay``: constant for ``constant_epochs`` then linear to 0 at ``train.epochs``, per epoch.
    ``onecycle``: per optimizer step over the whole run: linear warm-up from lr/25 to ``optim.lr``
    during the first ``warmup`` fraction of the steps, then cosine down to lr/(25·10⁴)
    (OneCycleLR; the right choice for short runs of a few hundred steps).
    """

    name: Literal["none", "cosine_restarts", "linear_decay", "onecycle"] = "cosine_restarts"
    t0: int = 10
    t_mult: int = 1
    eta_min: float = 1e-6
    constant_epochs: int = 0
    warmup: float = 0.25  # onecycle: fraction of the run's steps spent warming up

    def __post_init__(self) -> None:
        if self.t0 < 1 or self.t_mult < 1:
            raise ValueError("t0 and t_mult must be >= 1")
        if not 0 < self.warmup < 1:
            raise ValueError(f"warmup must be in (0, 1), got {self.warmup}")

    @property
    def per_step(self) -> bool:
        """True when the schedule advances every optimizer step instead of every epoch."""
        return self.name == "onecycle"


@dataclass
class TrainConfig:
    """The generic loop's knobs."""

    epochs: int = 10
    batch_size: int = 8
    accumulate: int = 1  # gradient accumulation steps per optimizer step
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    # end this invocation once this many epochs are done (continue with --resume); the schedule still spans `epochs`
    pause_after: int = 0
    check_replicas: int = 0  # DDP debugging: every N optimizer steps, fail unless all ranks hold identical weights
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto = bf16 on CUDA if supported
    early_stop: int = 0  # patience in epochs without improvement of the monitor; 0 = off
    seed: int = 0
    loader_workers: int = 2
    max_steps: int = 0  # cap on train batches per epoch; 0 = the whole epoch
    max_val_steps: int = 0  # cap on val batches; 0 = the whole val set
    sample_every: int = 1  # epochs between sample grids logged; 0 = never
    checkpoint_every: int = 0  # also keep a checkpoint every K epochs; 0 = best/latest only
    channels_last: bool = False  # NHWC tensors and weights (faster convolutions on tensor cores)
    cudnn_benchmark: bool = True  # CUDA: pick the fastest conv algorithms for the (fixed) input size
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"  # torch.compile mode
    compile_backend: str = "inductor"  # torch.compile backend (inductor needs a C++ compiler on CPU)
    cache_data: bool = False  # decode + resize every sample once, up front, into memory (small datasets)
    progress: bool = True  # tqdm bar per epoch on rank 0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "accumulate"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.grad_clip < 0 or self.early_stop < 0 or self.loader_workers < 0:
            raise ValueError("grad_clip, early_stop and loader_workers must be >= 0")


@dataclass
class ScalingConfig:
    """Ray Train scaling: ``workers`` DDP processes, each with these resources."""

    workers: int = 1
    gpus: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0  # worker-group restarts from the latest checkpoint after a failure
    keep_checkpoints: int = 2  # checkpoints kept on storage: the best by the task's metric, and the latest
    sync_batchnorm: bool = False  # GPUs: batch-norm statistics over the global batch (SyncBatchNorm)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be > 0")


@dataclass
class RunConfig:
    """Where a run lives: ``<storage>/<name>`` (a local path, NFS mount, s3:// or gs://).
    ``storage_endpoint``: the URL of an S3-compatible server for ``s3://`` storage (MinIO, Ceph, a local
    endpoint; empty: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS). Credentials come from the
    usual AWS variables or an instance profile."""

    name: str = ""  # empty: <task>-<timestamp>
    storage: str = "runs"
    storage_endpoint: str = ""


@dataclass
class TrackingConfig:
    """MLflow tracking. ``uri`` empty: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db."""

    enabled: bool = True
    uri: str = ""
    artifacts: str = "mlartifacts"  # artifact root for a new experiment on a local store
    experiment: str = ""  # empty: montage-<task>
    log_model: bool = True
    parent_run_id: str = ""  # set by tune: the sweep's parent run
    run_id: str = ""  # log into this run (set by the launchers: restarts and resumes keep one run)
    # a server that does not answer: at the start, refuse (required) or train and log when it is back;
    # during training, queue on disk in the run folder (at most outbox_limit records), retry after retry_s
    # doubling to retry_max_s, and wait up to drain_s at the end. Each request: timeout_s, retries quick retries
    required: bool = True
    timeout_s: float = 10.0
    retries: int = 2
    retry_s: float = 5.0
    retry_max_s: float = 120.0
    outbox_limit: int = 10000
    drain_s: float = 120.0


@dataclass
class DistillConfig:
    """Knowledge distillation: train against a teacher's outputs as well as the labels.
    ``teacher``: a checkpoint path or ``models:/montage-<task>@champion`` (empty: off); the
    loss term ``distill`` (soft-target KL for segmentation logits at ``temperature``, L1 to the
    teacher's images for harmonization and pix2pix) enters the total with ``weight``."""

    teacher: str = ""
    weight: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0:
            raise ValueError(f"distill: weight must be >= 0 and temperature > 0, got {self.weight}, {self.temperature}")


@dataclass
class InitConfig:
    """Start the run's networks from another checkpoint's weights (fine-tuning).
    ``checkpoint``: a checkpoint path of the same task (``models:/…`` is fetched by the
    launchers); its networks' layer widths are taken from the weights, so a channel-pruned
    network (``montage optimize --method prune``) trains in its pruned shape. Optimizer state,
    epoch and metrics start afresh."""

    checkpoint: str = ""
