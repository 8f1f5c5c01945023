"""``GET /``: the one-page tool (plain HTML + JS, no build step), shipped as package data."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _template() -> str:
    return resources.files("montage.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def page_html(auth: bool) -> str:
    """The page; with ``auth`` it shows the API-key field and sends the key as a bearer token."""
    return _template().replace("__AUTH__", "1" if auth else "0")
