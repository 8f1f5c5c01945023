"""`montage data check --ray`: Ray tasks on the session's Ray read the samples and the report is the
local readers' report (counts, rejections, statistics, the sample grid)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from montage.cli import main

VOLATILE = ("seconds", "samples_per_s", "workers", "reader")  # how it was read, not what


def _folder(root: Path) -> None:
    """12 images with masks of two sizes; one of random bytes, one empty file, one empty mask, one
    mask of another size than its image."""
    rng = np.random.default_rng(0)
    for i in range(12):
        h, w = (24, 32) if i % 3 else (32, 24)
        m = np.zeros((h, w), np.uint8)
        m[4 : 4 + i + 2, 3:15] = 255
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / "mask").mkdir(exist_ok=True)
        cv2.imwrite(str(root / "img" / f"{i:02d}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        cv2.imwrite(str(root / "mask" / f"{i:02d}.png"), m)
    (root / "img" / "03.png").write_bytes(rng.bytes(300))
    (root / "img" / "05.png").write_bytes(b"")
    cv2.imwrite(str(root / "mask" / "07.png"), np.zeros((24, 32), np.uint8))
    cv2.imwrite(str(root / "mask" / "10.png"), np.zeros((20, 20), np.uint8))


def test_ray_tasks_write_the_local_report(ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "data")  # relative paths: Ray workers must open the same files
    args = ["data", "check", "segmentation", "data.source=folder", "data.images=img", "data.masks=mask", "--grid", "4"]
    assert main([*args, "--workers", "0", "--out", str(tmp_path / "local")]) == 1
    assert main([*args, "--ray", "--chunk", "5", "--out", str(tmp_path / "ray")]) == 1
    local, remote = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("local", "ray"))
    assert (local["reader"], remote["reader"]) == ("loader", "Ray tasks") and remote["workers"] >= 1
    assert {r["reason"] for r in local["rejected"]} == {"unreadable", "empty_mask", "size_mismatch"}
    assert [r["name"] for r in local["rejected"]] == [
        str(tmp_path / "data" / "img" / f"{i:02d}.png") for i in (3, 5, 7, 10)
    ]
    assert local["splits"]["all"]["common_sizes"] == {"32x24": 5, "24x32": 3}
    assert {k: v for k, v in local.items() if k not in VOLATILE} == {
        k: v for k, v in remote.items() if k not in VOLATILE
    }
    grid = [(tmp_path / d / "samples_all.png").read_bytes() for d in ("local", "ray")]
    assert grid[0] == grid[1]
    assert _chunk_tasks() == 3  # 12 samples in Ray tasks of 5


def _chunk_tasks(timeout: float = 20.0) -> int:
    """How many of the check's Ray tasks finished (the State API catches up within seconds)."""
    import ray
    from ray.util.state import list_tasks

    gcs = ray.get_runtime_context().gcs_address  # other Rays may run on this machine
    deadline, n = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        found = list_tasks(address=gcs, filters=[("name", "=", "_read_chunk"), ("state", "=", "FINISHED")])
        n = len(found)
        if n >= 3:
            break
        time.sleep(0.5)
    return n
