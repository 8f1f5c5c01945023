"""A dataset's fingerprint: what a run's data was, cheaply (no sample is read).

Task-agnostic: the roots are the path-valued fields of the task's data config that exist on
this machine (``images``, ``annotations``, ``masks``, ``root``, ``val_*`` ...); the digest is a
SHA-256 over every file under them (relative path, size, modification time) and the data
config's own scalar fields (source, seed, sizes, counts: synthetic data is its config). Two runs
on different files, or on the same files after one changed, get different digests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fingerprint:
    source: str  # the data config's ``source``
    roots: dict[str, str]  # data config field → absolute path
    splits: dict[str, int]  # split → samples
    digest: str  # hex SHA-256 (files + config)
    files: int = 0
    bytes: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.digest[:12]

    def profile(self) -> dict[str, Any]:
        return {"splits": self.splits, "files": self.files, "bytes": self.bytes}


def _walk(path: Path) -> list[tuple[str, int, int]]:
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return out


def data_roots(data_cfg: Any) -> dict[str, Path]:
    """Path-valued fields of a data config that name an existing file or folder."""
    roots = {}
    for f in dataclasses.fields(data_cfg):
        value = getattr(data_cfg, f.name)
        if isinstance(value, str) and value and not f.name.endswith("source"):  # source kinds are names
            p = Path(value).expanduser()
            if p.exists():
                roots[f.name] = p.resolve()
    return roots


def absolute_data_paths(data_cfg: Any) -> None:
    """Make the data config's existing path fields (plain ``str`` fields naming a file or folder here)
    absolute: reports then name files unambiguously, and readers in other processes (Ray workers,
    whatever their working directory) open the same files."""
    types = {f.name: f.type for f in dataclasses.fields(data_cfg)}
    for key, path in data_roots(data_cfg).items():
        if types.get(key) in ("str", str):
            setattr(data_cfg, key, str(path))


def fingerprint(data_cfg: Any, splits: dict[str, int] | None = None) -> Fingerprint:
    """The fingerprint of a task's data config (``cfg.data``) and its split sizes."""
    scalars = {
        f.name: getattr(data_cfg, f.name)
        for f in dataclasses.fields(data_cfg)
        if isinstance(getattr(data_cfg, f.name), (str, int, float, bool, list, tuple))
    }
    roots = data_roots(data_cfg)
    h = hashlib.sha256(json.dumps(scalars, sort_keys=True, default=str).encode())
    n_files = n_bytes = 0
    for key in sorted(roots):
        h.update(f"\0{key}\0".encode())
        for rel, size, mtime in _walk(roots[key]):
            h.update(f"{rel}\t{size}\t{mtime}\n".encode())
            n_files += 1
            n_bytes += size
    return Fingerprint(
        source=str(getattr(data_cfg, "source", "")),
        roots={k: str(v) for k, v in roots.items()},
        splits=dict(splits or {}),
        digest=h.hexdigest(),
        files=n_files,
        bytes=n_bytes,
        config=scalars,
    )
