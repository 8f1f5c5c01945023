"""Configs shipped inside the package, found through ``importlib.resources`` so they work
from a wheel installed anywhere, not only from a source checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def packaged(kind: str, name: str) -> Path:
    """``montage/<kind>/<name>.yaml`` (kind: ``configs`` or ``tune_configs``)."""
    return Path(str(files("montage") / kind / f"{name.removesuffix('.yaml')}.yaml"))


def packaged_config(name: str) -> Path:
    return packaged("configs", name)


def packaged_tune(name: str) -> Path:
    return packaged("tune_configs", name)


def resolve_config_path(config: str | None) -> Path | None:
    """A YAML path, or the name of a config shipped in ``montage/configs`` (e.g. segmentation-tiny)."""
    if config is None:
        return None
    path = Path(config)
    if path.is_file():
        return path
    shipped = packaged_config(config)
    return shipped if shipped.is_file() else path
