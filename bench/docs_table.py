"""Benchmarks write their figures into the docs themselves, so no figure is copied by hand.

A docs file marks a bench's block with ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
``write_block`` replaces what lies between them with the command that ran, the machine and the
bench's output. The benches call it when given ``--docs``.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

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
