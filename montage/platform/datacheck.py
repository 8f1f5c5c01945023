"""Read every sample of a data config once and say what was rejected and what the data looks like.

A task hands the platform its sources as :class:`CheckSource` objects (split name → source,
:meth:`montage.platform.task.Task.check_sources`): each sample ``i`` is read by the task's own
loading code and returned as a :class:`Probe` (the input image, its mask or target). The
platform knows no task: it reads the samples in parallel (DataLoader worker processes here, or
any :data:`ReadAll` a launcher passes in, e.g. Ray tasks on a cluster), sorts the failures into
reasons, checks the masks a task requires to be non-empty, and
summarises sizes, aspect ratios and foreground fractions into ``report.json`` and one PNG grid
of random samples per split.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from montage.platform.imaging import letterbox, write_image

log = logging.getLogger(__name__)

REASONS = ("missing_file", "unreadable", "size_mismatch", "empty_mask", "bad_annotation", "duplicate", "error")
FG_BINS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
ASPECT_BINS = (0.0, 0.5, 0.75, 0.9, 1.1, 1.34, 2.0, float("inf"))
THUMB = 96


@dataclass
class Probe:
    """One sample as its task reads it: ``image`` RGB uint8 (H, W, 3); ``mask`` uint8 (H, W)
    0..255 (the foreground, overlaid on the grid); ``target`` an RGB image shown beside it;
    ``needs_foreground``: an all-zero mask rejects the sample."""

    image: np.ndarray
    mask: np.ndarray | None = None
    target: np.ndarray | None = None
    needs_foreground: bool = True


class CheckSource(Protocol):
    """What a task lends the check for one split: ``len``, a name per sample, and ``probe(i)``
    (which raises, naming the file, when sample ``i`` cannot be used)."""

    def __len__(self) -> int: ...

    def name(self, i: int) -> str: ...

    def probe(self, i: int) -> Probe: ...


_SIZES = re.compile(r"\d+\s*x\s*\d+.*\d+\s*x\s*\d+|differ in size|\(\d+, \d+\).*\(\d+, \d+\)")


def classify(exc: BaseException) -> str:
    """The reason of a failed read, from the exception the task's code raised."""
    msg = str(exc).lower()
    if isinstance(exc, FileNotFoundError) or "not found" in msg or "no such file" in msg:
        return "missing_file"
    if "decodable" in msg or "cannot decode" in msg or "is empty" in msg or "truncated" in msg:
        return "unreadable"
    if _SIZES.search(msg):
        return "size_mismatch"
    if isinstance(exc, json.JSONDecodeError) or "json" in msg or "annotation" in type(exc).__name__.lower():
        return "bad_annotation"
    if "format" in type(exc).__name__.lower() or "bitmap" in msg or "landmark" in msg or "label" in msg:
        return "bad_annotation"
    return "error"


def overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image with the mask's foreground tinted red (half strength) and its outline drawn."""
    out = image[..., :3].astype(np.float32)
    if mask is not None and mask.shape == image.shape[:2]:
        a = (mask.astype(np.float32) / 255)[..., None] * 0.5
        out = out * (1 - a) + np.array([255.0, 0.0, 0.0]) * a
        contours, _ = cv2.findContours((mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out = np.ascontiguousarray(out.clip(0, 255).astype(np.uint8))
        cv2.drawContours(out, contours, -1, (255, 255, 0), 1)
    return out.clip(0, 255).astype(np.uint8)


def _rgb(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return np.repeat(x[..., None], 3, axis=2)
    return x[..., :3] if x.shape[2] >= 3 else np.repeat(x[..., :1], 3, axis=2)


def thumbnails(p: Probe) -> list[np.ndarray]:
    """Tiles of one grid row: the image with its mask overlaid, then the target if any (each
    shrunk to the tile size first: the overlay costs nothing at full resolution)."""
    small = lambda x, interp=cv2.INTER_AREA: letterbox(np.ascontiguousarray(x), THUMB, interpolation=interp)[0]
    mask = p.mask if p.mask is not None and p.mask.shape == p.image.shape[:2] else None
    tiles = [overlay(small(_rgb(p.image)), None if mask is None else small(mask, cv2.INTER_LINEAR))]
    if p.target is not None:
        tiles.append(small(_rgb(p.target)))
    return tiles


class SampleReader(Dataset):
    """Position ``k`` of the samples to read → a small record (what the parallel readers return:
    never the decoded arrays, only the thumbnails of the samples the grid shows). Picklable when
    its source is: a reader on other processes or machines gets a copy."""

    def __init__(self, source: CheckSource, indices: list[int], grid: set[int]) -> None:
        self.source, self.indices, self.grid = source, indices, grid

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        rec: dict[str, Any] = {"index": i, "name": self.source.name(i)}
        try:
            p = self.source.probe(i)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding, sorted by reason
            return rec | {"reason": classify(exc), "message": str(exc)}
        h, w = p.image.shape[:2]
        rec |= {"h": h, "w": w}
        if p.mask is not None:
            fg = float((p.mask > 127).mean())
            rec["fg"] = fg
            if p.needs_foreground and not (p.mask > 0).any():
                return rec | {"reason": "empty_mask", "message": f"{rec['name']}: the mask is empty"}
        if i in self.grid:
            rec["thumbs"] = thumbnails(p)
        return rec


def _identity(x: Any) -> Any:
    return x


ReadAll = Callable[[SampleReader], Iterable[dict[str, Any]]]
"""Reads every position of a :class:`SampleReader` once and yields the records in position order
(the report's lists follow it)."""


def loader_read(workers: int = 0) -> ReadAll:
    """The local reader: ``workers`` DataLoader processes (0: this process)."""

    def read(reader: SampleReader) -> Iterable[dict[str, Any]]:
        return DataLoader(
            reader,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=8 if workers else None,
        )

    return read


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.quantile(np.asarray(values, np.float64), [0, 0.05, 0.5, 0.95, 1])
    return {k: round(float(v), 4) for k, v in zip(("min", "p5", "median", "p95", "max"), q)}


def _histogram(values: list[float], bins: tuple[float, ...]) -> dict[str, int]:
    counts, _ = np.histogram(np.asarray(values, np.float64), bins=np.asarray(bins))
    return {f"{lo:g}-{hi:g}": int(c) for lo, hi, c in zip(bins[:-1], bins[1:], counts)}


@dataclass
class SplitResult:
    samples: int
    ok: int
    rejected: list[dict[str, str]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    grid: np.ndarray | None = None


def check_split(
    source: CheckSource, workers: int = 0, grid: int = 16, seed: int = 0, read: ReadAll | None = None
) -> SplitResult:
    """Read every sample of ``source`` once: with ``read`` (a parallel reader) or else in ``workers``
    loader processes (0 = this process)."""
    n = len(source)
    names = [source.name(i) for i in range(n)]
    seen: set[str] = set()
    rejected: list[dict[str, str]] = []
    todo = []
    for i, nm in enumerate(names):
        if nm in seen:
            rejected.append({"name": nm, "reason": "duplicate", "message": f"{nm}: listed more than once"})
        else:
            seen.add(nm)
            todo.append(i)
    rng = np.random.default_rng(seed)
    shown = set(rng.choice(todo, size=min(len(todo), 2 * grid), replace=False).tolist()) if todo and grid else set()
    records = (read or loader_read(workers))(SampleReader(source, todo, shown))
    sizes: list[tuple[int, int]] = []
    fgs: list[float] = []
    rows: dict[int, list[np.ndarray]] = {}
    for rec in records:
        if "reason" in rec:
            rejected.append({"name": rec["name"], "reason": rec["reason"], "message": rec["message"]})
            continue
        sizes.append((rec["h"], rec["w"]))
        if "fg" in rec:
            fgs.append(rec["fg"])
        if "thumbs" in rec:
            rows[rec["index"]] = rec["thumbs"]
    ok = n - len(rejected)
    aspects = [w / h for h, w in sizes]
    stats: dict[str, Any] = {
        "reasons": dict(Counter(r["reason"] for r in rejected)),
        "width": _quantiles([w for _, w in sizes]),
        "height": _quantiles([h for h, _ in sizes]),
        "aspect": _quantiles(aspects),
        "aspect_histogram": _histogram(aspects, ASPECT_BINS) if aspects else {},
        "common_sizes": {f"{w}x{h}": c for (h, w), c in Counter(sizes).most_common(5)},
    }
    if fgs:
        stats["foreground"] = _quantiles(fgs)
        stats["foreground_histogram"] = _histogram(fgs, FG_BINS)
    return SplitResult(n, ok, rejected, stats, make_grid([rows[k] for k in sorted(rows)[:grid]]))


def make_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray | None:
    """Rows of equal-size tiles (four samples side by side per grid row) → one uint8 RGB image."""
    if not rows:
        return None
    cols = max(len(r) for r in rows)
    per_line = 4
    blank = np.full((THUMB, THUMB, 3), 255, np.uint8)
    cells = [(r + [blank] * (cols - len(r))) for r in rows]
    lines = []
    for j in range(0, len(cells), per_line):
        group = cells[j : j + per_line] + [[blank] * cols] * (per_line - len(cells[j : j + per_line]))
        line = [
            np.concatenate([np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255) for t in c], 1)
            for c in group
        ]
        lines.append(np.concatenate([np.pad(x, ((0, 0), (0, 3 * pad), (0, 0)), constant_values=200) for x in line], 1))
    return np.concatenate(lines, 0)


@dataclass
class CheckReport:
    """What ``montage data check`` found, as written to ``report.json``."""

    task: str
    source: str
    splits: dict[str, dict[str, Any]]
    rejected: list[dict[str, str]]
    rejected_fraction: float
    threshold: float
    seconds: float
    workers: int
    reader: str = "loader"

    @property
    def passed(self) -> bool:
        return self.rejected_fraction <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "source": self.source,
            "passed": self.passed,
            "rejected_fraction": round(self.rejected_fraction, 6),
            "threshold": self.threshold,
            "samples": sum(s["samples"] for s in self.splits.values()),
            "samples_per_s": round(sum(s["samples"] for s in self.splits.values()) / max(self.seconds, 1e-9), 2),
            "seconds": round(self.seconds, 3),
            "workers": self.workers,
            "reader": self.reader,
            "splits": self.splits,
            "rejected": self.rejected,
        }


def run_check(
    task: str,
    source_kind: str,
    sources: dict[str, CheckSource],
    out: str | Path,
    workers: int = 0,
    threshold: float = 0.01,
    grid: int = 16,
    seed: int = 0,
    read: ReadAll | None = None,
    reader: str = "loader",
) -> CheckReport:
    """Check every split, write ``report.json`` and ``samples_<split>.png`` under ``out``. ``read``:
    a parallel reader instead of ``workers`` loader processes, named ``reader`` in the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits: dict[str, dict[str, Any]] = {}
    rejected: list[dict[str, str]] = []
    for split, src in sources.items():
        res = check_split(src, workers=workers, grid=grid, seed=seed, read=read)
        splits[split] = {"samples": res.samples, "ok": res.ok, "rejected": len(res.rejected), **res.stats}
        rejected += [{"split": split, **r} for r in res.rejected]
        if res.grid is not None:
            write_image(out / f"samples_{split}.png", res.grid)
            splits[split]["grid"] = f"samples_{split}.png"
        log.info("%s: %d samples, %d rejected", split, res.samples, len(res.rejected))
    total = sum(s["samples"] for s in splits.values())
    report = CheckReport(
        task,
        source_kind,
        splits,
        rejected,
        len(rejected) / max(total, 1),
        threshold,
        time.perf_counter() - t0,
        workers,
        reader,
    )
    (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2))
    return report


def format_table(report: dict[str, Any], max_rejected: int = 20) -> str:
    """The report as the lines ``montage data check`` prints."""
    head = (
        f"{'split':<10} {'samples':>8} {'ok':>8} {'rejected':>8}  {'size (median WxH)':<18} {'aspect':<16} "
        "fg (p5/median/p95)"
    )
    lines = [head, "-" * len(head)]
    for split, s in report["splits"].items():
        w, h, a, fg = s.get("width", {}), s.get("height", {}), s.get("aspect", {}), s.get("foreground", {})
        size = f"{w.get('median', 0):g}x{h.get('median', 0):g}" if w else "-"
        aspect = f"{a.get('min', 0):.2f}..{a.get('max', 0):.2f}" if a else "-"
        fgs = f"{fg['p5']:.3f}/{fg['median']:.3f}/{fg['p95']:.3f}" if fg else "-"
        lines.append(f"{split:<10} {s['samples']:>8} {s['ok']:>8} {s['rejected']:>8}  {size:<18} {aspect:<16} {fgs}")
    reasons = Counter(r["reason"] for r in report["rejected"])
    if reasons:
        lines.append("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    for r in report["rejected"][:max_rejected]:
        lines.append(f"  [{r['split']}] {r['reason']:<15} {r['message']}")
    if len(report["rejected"]) > max_rejected:
        lines.append(f"  ... and {len(report['rejected']) - max_rejected} more (report.json)")
    verdict = "PASS" if report["passed"] else "FAIL"
    reader = report.get("reader", "loader")
    readers = f"{report['workers']} loader workers" if reader == "loader" else f"{reader} on {report['workers']} CPUs"
    lines.append(
        f"{verdict}: {report['rejected_fraction']:.2%} rejected (threshold {report['threshold']:.2%}); "
        f"{report['samples']} samples in {report['seconds']:.2f} s ({report['samples_per_s']:.1f}/s, {readers})"
    )
    return "\n".join(lines)
