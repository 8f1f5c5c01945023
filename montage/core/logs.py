"""Logging set-up shared by the commands, Ray workers and Tune trials."""

from __future__ import annotations

import logging
import sys

NOISY_LOGGERS = ("ray", "mlflow", "alembic", "urllib3", "filelock", "ray.train", "ray.tune", "ray.serve", "optuna")


def setup_logging(level: int = logging.INFO, quiet_ray: bool = True) -> None:
    """montage's own loggers at ``level``; everything else (Ray, MLflow, ...) at warnings.

    Adds a handler only where none exists (a Ray worker already has Ray's)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    logging.getLogger("montage").setLevel(level)
    root.setLevel(logging.WARNING if quiet_ray else level)
    if quiet_ray:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
