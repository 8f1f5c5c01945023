"""An in-memory cache of decoded, resized samples (``train.cache_data``), for small datasets.

A task's dataset splits each sample into a deterministic part — decode, resize, generate
the pair for index *i* — and a random part (augmentation). With the cache on, the
deterministic part runs once per index, up front, on a thread pool (OpenCV and NumPy release
the GIL), before the DataLoader starts its worker processes: forked workers then share the
arrays' pages instead of each filling a copy. Every DDP worker process holds its own cache.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FRACTION = 0.5  # of the memory available now: refuse a cache estimated to need more


class CacheTooLargeError(MemoryError):
    pass


def nbytes(item: object) -> int:
    """Bytes held by the arrays in ``item`` (an array or a tuple/list/dict of them)."""
    if isinstance(item, np.ndarray):
        return item.nbytes
    if isinstance(item, dict):
        return sum(nbytes(v) for v in item.values())
    if isinstance(item, (tuple, list)):
        return sum(nbytes(v) for v in item)
    return 0


def available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


class SampleCache(Generic[T]):
    """``load(i)``, computed once up front for ``indices`` (``enabled``) or on every call.

    ``indices``: the indices this dataset will ask for (a split of a shared source caches only
    its own); an index outside them is loaded on demand.
    """

    def __init__(
        self,
        load: Callable[[int], T],
        indices: Sequence[int],
        enabled: bool,
        name: str = "dataset",
        threads: int | None = None,
    ) -> None:
        self.load = load
        self.items: dict[int, T] = {}
        self.enabled = enabled and len(indices) > 0
        if self.enabled:
            self.items = self._fill(list(indices), name, threads or min(8, os.cpu_count() or 1))

    def _fill(self, indices: list[int], name: str, threads: int) -> dict[int, T]:
        t0 = time.perf_counter()
        n = len(indices)
        first = self.load(indices[0])
        estimate = nbytes(first) * n
        free = available_memory()
        if free is not None and estimate > MAX_FRACTION * free:
            raise CacheTooLargeError(
                f"train.cache_data: caching {name} ({n} samples) needs about {estimate / 2**30:.1f} GiB, more than "
                f"half of the {free / 2**30:.1f} GiB available; set train.cache_data=false or use a smaller data.size"
            )
        with ThreadPoolExecutor(threads) as pool:
            rest = list(pool.map(self.load, indices[1:]))
        log.info("cached %s: %d samples, %.0f MiB in %.1f s", name, n, estimate / 2**20, time.perf_counter() - t0)
        return dict(zip(indices, [first, *rest]))

    def __call__(self, i: int) -> T:
        item = self.items.get(i)
        return item if item is not None else self.load(i)
