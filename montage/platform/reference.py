"""The configuration reference, generated from the config dataclasses (docs/CONFIG.md).

``python -m montage.platform.reference > docs/CONFIG.md``; a test checks the file is current.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from importlib.metadata import entry_points
from typing import Any

from montage.core.config import to_dict
from montage.core.registry import TASKS
from montage.core.sections import (
    DistillConfig,
    InitConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    SchedConfig,
    TrackingConfig,
    TrainConfig,
)


def _type(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _rows(cls: type, prefix: str, defaults: dict[str, Any] | None = None) -> list[str]:
    hints = typing.get_type_hints(cls)
    instance = cls()
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            rows += _rows(type(value), key, defaults)
            continue
        shown = (defaults or {}).get(key, to_dict(value))
        rows.append(f"| `{key}` | `{_type(hints[f.name])}` | `{shown!r}` |")
    return rows


def _section(title: str, cls: type, prefix: str, defaults: dict[str, Any] | None = None) -> list[str]:
    doc = inspect.cleandoc(cls.__doc__ or "")
    out = [f"### {title}", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        out += [doc, ""]
    return out + ["| key | type | default |", "|---|---|---|", *_rows(cls, prefix, defaults), ""]


def reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m montage.platform.reference`;",
        "every key can be set in a YAML file or as `key=value` on the command line.",
        "",
        "## Platform sections (every task)",
        "",
    ]
    for name, cls in (
        ("optim", OptimConfig),
        ("sched", SchedConfig),
        ("train", TrainConfig),
        ("scaling", ScalingConfig),
        ("run", RunConfig),
        ("tracking", TrackingConfig),
        ("distill", DistillConfig),
        ("init", InitConfig),
    ):
        lines += _section(f"`{name}`", cls, name)
    # the installed tasks (entry points), not ones a test or notebook registered at run time
    for task in sorted(ep.name for ep in entry_points(group="montage.tasks")):
        spec = TASKS.get(task).spec
        lines += [
            f"## Task `{task}`",
            "",
            f"Monitored metric: `{TASKS.get(task).monitor[0]}` ({TASKS.get(task).monitor[1]}).",
        ]
        if spec.defaults:
            lines += [
                "Task defaults over the platform's: "
                + ", ".join(f"`{k}={v!r}`" for k, v in spec.defaults.items())
                + "."
            ]
        lines.append("")
        for name in ("model", "data", "loss"):
            lines += _section(f"`{name}`", getattr(spec, name), name)
        if spec.optim is not OptimConfig:
            lines += _section("`optim`", spec.optim, "optim", spec.defaults)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
