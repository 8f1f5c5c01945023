"""What a training could not send to its MLflow server, kept on disk until the server is back.

A training must not stop because its tracking server went away (a restarted head, a network
blip). The MLflow hook sends each record (an epoch's metrics and sample grid, tags, the end of
the run) directly; when the server does not answer, the record goes to the run's outbox instead —
``<run folder>/tracking-outbox/``: ``records.jsonl`` in order, images as PNG files beside it — and
later records queue behind it, so the run's history keeps its order. The hook retries with
exponential backoff (``tracking.retry_s`` doubling up to ``tracking.retry_max_s``) and flushes
the whole outbox when the server answers again. The outbox is bounded (``tracking.outbox_limit``
records): past it new sample grids are dropped first, then new metrics, each drop counted in the
warning. A restart or a resume of the run reads the outbox back and sends it first; a training
that ends while the server is away waits ``tracking.drain_s`` for it before giving up.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OUTBOX = "tracking-outbox"


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the tracking server did not answer (refused, timed out, 5xx after
    MLflow's retries) rather than answering no (a bad request, a missing run: those raise)."""
    from mlflow.exceptions import MlflowException, RestException

    try:
        import requests

        transport: tuple[type[BaseException], ...] = (requests.RequestException, ConnectionError, TimeoutError)
    except ImportError:  # pragma: no cover - mlflow depends on requests
        transport = (ConnectionError, TimeoutError)
    if isinstance(exc, RestException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, transport) or isinstance(exc, MlflowException)


@dataclass
class Outbox:
    """Records waiting for the tracking server, in ``folder`` (see the module docstring)."""

    folder: Path
    limit: int = 10000
    records: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.file.is_file():
            lines = self.file.read_text().splitlines()
            self.records = [json.loads(line) for line in lines if line.strip()]
            if self.records:
                log.warning("tracking outbox %s holds %d record(s) from before: sending them first", self.folder,
                            len(self.records))  # fmt: skip

    @property
    def file(self) -> Path:
        return self.folder / "records.jsonl"

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: dict[str, Any], image: Any = None) -> None:
        """Queue ``record`` (JSON-able); ``image`` (an HxWx3 uint8 array) is written as a PNG beside it."""
        if len(self.records) >= self.limit and record.get("kind") != "end":
            self.dropped += 1
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if image is not None:
            if len(self.records) >= self.limit * 0.9:  # images go first when the outbox fills
                self.dropped += 1
            else:
                from PIL import Image

                name = f"{len(self.records):06d}_{Path(record['artifact_file']).name}"
                Image.fromarray(image).save(self.folder / name)
                record = {**record, "image": name}
        self.records.append(record)
        with self.file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def flush(self, send: Callable[[dict[str, Any], Path | None], None]) -> int:
        """Send the records in order with ``send(record, image_path)`` until one fails; the sent
        ones leave the outbox (file rewritten). Returns how many were sent; re-raises the failure."""
        sent = 0
        try:
            for record in self.records:
                image = self.folder / record["image"] if record.get("image") else None
                send(record, image)
                if image is not None:
                    image.unlink(missing_ok=True)
                sent += 1
        finally:
            if sent:
                self.records = self.records[sent:]
                self._rewrite()
        return sent

    def _rewrite(self) -> None:
        if not self.records:
            self.file.unlink(missing_ok=True)
            return
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        tmp.replace(self.file)


@dataclass
class Backoff:
    """When to try the server again: ``first`` seconds after a failure, doubling up to ``most``."""

    first: float = 5.0
    most: float = 120.0
    delay: float = 0.0
    next_try: float = 0.0
    failing_since: float | None = None

    def due(self) -> bool:
        return time.monotonic() >= self.next_try

    def failed(self) -> None:
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        self.delay = min(self.most, self.delay * 2 if self.delay else self.first)
        self.next_try = now + self.delay

    def succeeded(self) -> None:
        self.delay, self.next_try, self.failing_since = 0.0, 0.0, None
