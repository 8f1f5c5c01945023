"""Benchmarks write their figures into the docs themselves, so no figure is copied by hand.

A docs file marks a bench's block with ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
``write_block`` replaces what lies between them with the command that ran, the machine and the
bench's output. The benches call it when given ``--docs``; a bench whose report is what it prints
keeps a copy with :class:`Tee` and hands it to :func:`publish`.
"""

from __future__ import annotations

import io
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}"
    )


def write_block(doc: str | Path, name: str, body: str, command: str, markdown: bool = False) -> Path:
    """Replace the ``name`` block of ``doc`` (a path relative to the repository root, or absolute) with
    ``body`` (shown as preformatted text unless ``markdown``), headed by ``command`` and the machine."""
    path = Path(doc) if Path(doc).is_absolute() else ROOT / doc
    text = path.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no block {start} … {end}")
    shown = body.strip() if markdown else f"```\n{body.strip()}\n```"
    head = f"`{command}` ({time.strftime('%Y-%m-%d')}, {machine()}):"
    block = f"{start}\n{head}\n\n{shown}\n{end}"
    path.write_text(pattern.sub(lambda _: block, text, count=1))
    return path


def command_line() -> str:
    """The command that ran this bench, as a reader would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


class Tee(io.TextIOBase):
    """``with Tee() as out:`` prints as usual and keeps a copy of what the entering thread writes to
    standard output in ``out.text`` (not what other threads print there, such as the worker log lines
    Ray's driver forwards: ``(raylet) ...``)."""

    def __init__(self) -> None:
        self._copy = io.StringIO()
        self._stdout: TextIO = sys.stdout
        self._thread = threading.get_ident()

    def __enter__(self) -> Tee:
        self._stdout, sys.stdout = sys.stdout, self
        self._thread = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self._stdout

    def write(self, text: str) -> int:
        self._stdout.write(text)
        if threading.get_ident() != self._thread:
            return len(text)
        return self._copy.write(text)

    def flush(self) -> None:
        self._stdout.flush()

    @property
    def text(self) -> str:
        return self._copy.getvalue()


def publish(doc: str | Path, name: str, body: str, markdown: bool = False) -> None:
    """``write_block`` with the command that ran this process, and a line saying where it went."""
    print(f"wrote {write_block(doc, name, body, command_line(), markdown)}", file=sys.stderr)
