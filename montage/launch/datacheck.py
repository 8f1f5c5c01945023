"""``montage data check --ray``: the task's own per-sample probe mapped over chunks of sample
positions with Ray tasks, so a dataset on shared storage is read by every node of a cluster.

The platform's check (:mod:`montage.platform.datacheck`) stays the one place that reads, sorts
and summarises: this module only replaces its local DataLoader by a :data:`ReadAll` that ships
the picklable :class:`SampleReader` (the task's check source inside) to the object store once
and runs ``reader[k]`` for each chunk of positions in a Ray task. Records come back in position
order, so the report is the one the local readers write.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterator

from montage.platform.datacheck import ReadAll, SampleReader

log = logging.getLogger(__name__)


def _read_chunk(reader: SampleReader, start: int, stop: int) -> list[dict[str, Any]]:
    return [reader[k] for k in range(start, stop)]


def chunk_size(n: int, cpus: int, chunk: int = 0) -> int:
    """Samples per Ray task: ``chunk``, or about four tasks per CPU, 8 to 256 samples each."""
    if chunk > 0:
        return chunk
    return min(256, max(8, -(-n // (4 * max(cpus, 1)))))


def ray_read(chunk: int = 0, in_flight: int = 0) -> ReadAll:
    """A reader for :func:`~montage.platform.datacheck.run_check` on the connected Ray cluster:
    ``chunk`` samples per task (0: :func:`chunk_size`), at most ``in_flight`` tasks submitted and
    not yet collected (0: four per CPU), one CPU each."""
    import ray

    remote = ray.remote(num_cpus=1)(_read_chunk)

    def read(reader: SampleReader) -> Iterator[dict[str, Any]]:
        n = len(reader)
        if n == 0:
            return
        cpus = int(ray.cluster_resources().get("CPU", 1))
        size = chunk_size(n, cpus, chunk)
        try:
            ref = ray.put(reader)
        except Exception as exc:  # noqa: BLE001 - cloudpickle raises TypeError, PicklingError, ...
            raise ValueError(
                f"the {type(reader.source).__name__} check source cannot be sent to Ray workers: {exc}"
            ) from exc
        limit = in_flight or 4 * max(cpus, 1)
        pending: deque = deque()
        for start in range(0, n, size):
            pending.append(remote.remote(ref, start, min(start + size, n)))
            if len(pending) >= limit:
                yield from ray.get(pending.popleft())
        while pending:
            yield from ray.get(pending.popleft())

    return read


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 0))
