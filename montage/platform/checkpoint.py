"""Full-state checkpoints: one ``torch.save`` dict, written atomically, read with
``weights_only=True`` (no pickled code is ever executed on load)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from montage.core.errors import CheckpointError  # defined in core: the CLI catches it without importing torch

FORMAT = "montage-checkpoint/1"
FILENAME = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a folder holding ``checkpoint.pt`` (a Ray checkpoint dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(
    path: str | Path,
    task: str | None = None,
    model_config: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint safely and check it belongs to ``task`` / ``model_config``."""
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a montage checkpoint (format {FORMAT!r} expected)")
    if task is not None and state.get("task") != task:
        raise CheckpointError(f"{path} is a '{state.get('task')}' checkpoint, not '{task}'")
    if model_config is not None:
        saved = state.get("config", {}).get("model")
        if saved != model_config:
            diff = sorted(
                k for k in set(saved or {}) | set(model_config) if (saved or {}).get(k) != model_config.get(k)
            )
            raise CheckpointError(
                f"{path} was trained with a different model (differs in model.{', model.'.join(diff)})"
            )
    return state
