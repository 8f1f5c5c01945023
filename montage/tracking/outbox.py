"""What a training could not send to its MLflow server, kept until the server is back.

A training must not stop because its tracking server went away (a restarted head, a network
blip). The MLflow hook sends each record (an epoch's metrics and sample grid, tags, the end of
the run) directly; when the server does not answer, the record goes to the run's outbox instead —
``<run folder>/tracking-outbox/``: ``records.jsonl`` in order, images (PNG) and model checkpoints
beside it — and later records queue behind it, so the run's history keeps its order. The hook
retries with exponential backoff (``tracking.retry_s`` doubling up to ``tracking.retry_max_s``)
and flushes the whole outbox when the server answers again. The outbox is bounded
(``tracking.outbox_limit`` records): past 90 % of it new sample grids are dropped, past it new
metrics too, each drop counted in the warning. A restart or a resume of the run reads the outbox
back and sends it first; a training that ends while the server is away waits ``tracking.drain_s``
for it before giving up, and leaves the outbox for the next one.

When the run folder is on object storage, the worker keeps its working copy on its own disk and a
:class:`Mirror` holds the outbox in the run folder there: a restart on another node (nodes share no
disk) finds it, and a file leaves it only once its record has been sent.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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


class Mirror(Protocol):
    """The durable copy of an outbox whose own folder does not outlive its worker (the run folder on
    object storage); ``where`` names it in messages. Its methods raise ``OSError`` when it cannot be reached."""

    where: str

    def pull(self, local: Path) -> None:
        """Copy every file of the copy into ``local`` (nothing when there is none)."""

    def push(self, local: Path, name: str) -> None:
        """Copy ``local / name`` into the copy."""

    def remove(self, name: str) -> None:
        """Remove ``name`` from the copy (no error when it is not there)."""


@dataclass
class Outbox:
    """Records waiting for the tracking server, in ``folder`` (see the module docstring) and, with a
    ``mirror``, in its durable copy too."""

    folder: Path
    limit: int = 10000
    mirror: Mirror | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    unsynced: set[str] = field(default_factory=set)  # files the mirror has not taken yet

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        if self.mirror is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.mirror.pull(self.folder)  # a failure here is the storage's: the training cannot go on without it
        if self.file.is_file():
            lines = self.file.read_text().splitlines()
            self.records = [json.loads(line) for line in lines if line.strip()]
            if self.records:
                log.warning("tracking outbox %s holds %d record(s) from before: sending them first", self.where,
                            len(self.records))  # fmt: skip

    @property
    def file(self) -> Path:
        return self.folder / "records.jsonl"

    @property
    def where(self) -> str:
        """Where the records wait (the durable copy when there is one)."""
        return self.mirror.where if self.mirror is not None else str(self.folder)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: dict[str, Any], image: Any = None, attachment: Path | None = None) -> None:
        """Queue ``record`` (JSON-able); ``image`` (an HxWx3 uint8 array) is written as a PNG beside it
        (``record["image"]``), ``attachment`` (a file that may be gone when the record is sent: a
        checkpoint) copied beside it (``record["file"]``)."""
        if len(self.records) >= self.limit and record.get("kind") != "end":
            self.dropped += 1
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        changed = []
        if image is not None:
            if len(self.records) >= self.limit * 0.9:  # images go first when the outbox fills
                self.dropped += 1
            else:
                from PIL import Image

                name = f"{uuid.uuid4().hex[:12]}_{Path(record['artifact_file']).name}"
                Image.fromarray(image).save(self.folder / name)
                record, changed = {**record, "image": name}, [*changed, name]
        if attachment is not None:
            import shutil

            name = f"{uuid.uuid4().hex[:12]}_{attachment.name}"
            shutil.copy2(attachment, self.folder / name)
            record, changed = {**record, "file": name}, [*changed, name]
        self.records.append(record)
        with self.file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._sync(*changed, self.file.name)

    def path(self, record: dict[str, Any], key: str) -> Path | None:
        """The local file a record's ``image`` or ``file`` names."""
        return self.folder / record[key] if record.get(key) else None

    def flush(self, send: Callable[[dict[str, Any], Path | None], None]) -> int:
        """Send the records in order with ``send(record, image_path)`` until one fails; the sent
        ones leave the outbox (file rewritten, their files removed). Returns how many were sent;
        re-raises the failure."""
        sent, done = 0, []
        try:
            for record in self.records:
                send(record, self.path(record, "image"))
                done += [record[k] for k in ("image", "file") if record.get(k)]
                sent += 1
        finally:
            if sent:
                self.records = self.records[sent:]
                self._rewrite()
                for name in done:  # only once the records naming them are gone
                    (self.folder / name).unlink(missing_ok=True)
                    self._unsync(name)
        return sent

    def _rewrite(self) -> None:
        if not self.records:
            self.file.unlink(missing_ok=True)
            self._unsync(self.file.name)
            return
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        tmp.replace(self.file)
        self._sync(self.file.name)

    def _sync(self, *names: str) -> None:
        """Copy ``names`` (and what an earlier try could not) to the mirror; a mirror that cannot be
        reached is tried again at the next change, the training goes on."""
        if self.mirror is None:
            return
        self.unsynced.update(names)
        for name in sorted(self.unsynced, key=lambda n: n == self.file.name):  # the records after their files
            if not (self.folder / name).is_file():
                self.unsynced.discard(name)
                continue
            try:
                self.mirror.push(self.folder, name)
            except OSError as exc:
                log.warning("tracking outbox: could not copy %s to %s (%s); trying again at the next record", name,
                            self.mirror.where, str(exc).splitlines()[0][:200])  # fmt: skip
                return
            self.unsynced.discard(name)

    def _unsync(self, name: str) -> None:
        if self.mirror is None:
            return
        self.unsynced.discard(name)
        try:
            self.mirror.remove(name)
        except OSError as exc:  # a sent record's file left behind: harmless, the records no longer name it
            log.warning("tracking outbox: could not remove %s from %s (%s)", name, self.mirror.where, exc)


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
