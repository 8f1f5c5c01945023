"""What the command modules share: the launch time, config loading, number formatting."""

from __future__ import annotations

import time
from typing import Any, Sequence

LAUNCHED_AT = time.time()  # before the heavy imports: `montage train` reports start-up from here

from montage.core.paths import resolve_config_path  # noqa: E402  (light: no torch, Ray or MLflow)

ADDRESS_HELP = (
    "Ray address: auto joins a `ray start` cluster on this machine (default $RAY_ADDRESS, else a private local Ray)"
)
TRACKING_HELP = "default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db"


def load_config_for(task: str, config: str | None, overrides: Sequence[str]) -> Any:
    """The experiment config of ``task``: defaults, the YAML file (or shipped config name), overrides."""
    from montage.core.config import load_config
    from montage.core.registry import TASKS

    task_cls = TASKS.get(task)
    return load_config(task, task_cls.spec, resolve_config_path(config), list(overrides))


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
