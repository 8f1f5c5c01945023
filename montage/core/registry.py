"""Name → object tables (tasks, encoders, data sources, ...).

Tasks are found through the ``montage.tasks`` entry-point group declared in
``pyproject.toml``, so the platform never imports a task module by name; anything can
also register itself with the :meth:`Registry.register` decorator (tests do).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown name was looked up; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__")
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._items[key] = obj
            return obj

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self._group is None:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self._group):
            if ep.name not in self._items:
                self._items[ep.name] = ep  # loaded on first use

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._items:
            valid = ", ".join(self.names()) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} '{name}'; valid {self.kind}s: {valid}")
        item = self._items[name]
        if hasattr(item, "load") and hasattr(item, "group"):  # a lazy entry point
            item = item.load()
            self._items[name] = item
        return item

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items


TASKS: Registry = Registry("task", "montage.tasks")
DATA_COMMANDS: Registry = Registry("data command", "montage.data")  # name → fn(argv) -> exit code
