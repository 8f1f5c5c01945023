"""The Ray session: connect to a cluster or start a private local Ray, and storage paths."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS (``auto``: a ``ray start`` cluster on this machine),
    or else start a private local Ray, once per process. Never guesses: a stale
    ``ray start`` record on this machine must not make a laptop run wait on a dead head."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or "local",
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def storage_path(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).resolve())


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes on this machine (Linux: their process title
    names the ``RayTrainWorker`` actor), for fault-injection tests and drills."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)
