"""The configuration reference of every config file type (training, tune, serve), generated from
their dataclasses: each key with its type, default and the comment written beside its field.

``python -m montage.cli.reference > docs/CONFIG.md``; ``tests/test_config.py`` fails when the file
is stale. The sections all live in :mod:`montage.core` (``sections``, ``tune_sections``, ``serve_sections``);
this sits on the top layer as the command that prints them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from importlib.metadata import entry_points
from typing import Any

from montage.core.config import ExperimentConfig, to_dict
from montage.core.registry import TASKS
from montage.core.sections import OptimConfig

REQUIRED = "(required)"
_IGNORED = ("noqa", "fmt:", "type:")


def _type(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _comments(cls: type) -> dict[str, str]:
    """Field name → the comments on its lines and on the comment lines right above it (bases first)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = src.splitlines()
        notes = {
            t.start[0]: t.string.lstrip("#").strip()
            for t in tokenize.generate_tokens(io.StringIO(src).readline)
            if t.type == tokenize.COMMENT and not t.string.lstrip("# ").startswith(_IGNORED)
        }
        node = ast.parse(src).body[0]
        for field in getattr(node, "body", []):
            if not (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)):
                continue
            above, ln = [], field.lineno - 1
            while ln >= 1 and lines[ln - 1].strip().startswith("#"):
                above.insert(0, notes.get(ln, ""))
                ln -= 1
            inline = [notes[i] for i in range(field.lineno, (field.end_lineno or field.lineno) + 1) if i in notes]
            text = " ".join(t for t in above + inline if t)
            if text:
                out[field.target.id] = text
    return out


def _default(f: dataclasses.Field, instance: Any) -> Any:
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _rows(
    cls: type, prefix: str, instance: Any = None, defaults: dict[str, Any] | None = None, nested: bool = True
) -> list[str]:
    hints = typing.get_type_hints(cls)
    notes = _comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value = _default(f, instance)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            if nested:
                rows += _rows(type(value), key, value, defaults)
            continue
        shown = (defaults or {}).get(key, REQUIRED if value is dataclasses.MISSING else to_dict(value))
        note = notes.get(f.name, "").replace("|", "\\|")
        rows.append(
            f"| `{key}` | `{_type(hints[f.name])}` | `{shown!r}` | {note} |".replace("`'(required)'`", REQUIRED)
        )
    return rows


def _section(
    title: str,
    cls: type,
    prefix: str,
    defaults: dict[str, Any] | None = None,
    instance: Any = None,
    nested: bool = True,
    level: str = "###",
) -> list[str]:
    doc = inspect.cleandoc(cls.__doc__ or "")
    out = [f"{level} {title}", ""]
    if doc and not doc.startswith(cls.__name__ + "("):
        out += [doc, ""]
    head = ["| key | type | default | description |", "|---|---|---|---|"]
    return out + head + _rows(cls, prefix, instance, defaults, nested) + [""]


def training_reference() -> list[str]:
    lines = [
        "## Training configs (`montage train <task> --config F`)",
        "",
        "A training config is the platform's sections below plus the task's `model`, `data` and `loss`;",
        "the shipped ones are `montage/configs/<task>{,-tiny,-smoke}.yaml`.",
        "",
    ]
    # every platform section of ExperimentConfig, in its order: a section added there is documented here
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "optim":
            lines += _section("`optim`", OptimConfig, "optim")
        elif dataclasses.is_dataclass(hints[f.name]):
            lines += _section(f"`{f.name}`", hints[f.name], f.name)
    # the installed tasks (entry points), not ones a test or notebook registered at run time
    for task in sorted(ep.name for ep in entry_points(group="montage.tasks")):
        spec = TASKS.get(task).spec
        lines += [
            f"### Task `{task}`",
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
            lines += _section(f"`{task}` · `{name}`", getattr(spec, name), name, level="####")
        if spec.optim is not OptimConfig:
            lines += _section(f"`{task}` · `optim`", spec.optim, "optim", spec.defaults, level="####")
    return lines


def tune_reference() -> list[str]:
    from montage.core.tune_sections import DISTRIBUTIONS, SchedulerConfig, TuneConfig

    lines = [
        "## Tune configs (`montage tune F`)",
        "",
        "The shipped ones are `tune_configs/<task>{,-tiny}.yaml`. Overrides on the command line set the",
        "tune config's keys (`num_samples=4`), or under `base.` the training config's (`base.train.epochs=6`).",
        "",
    ]
    lines += _section("top level", TuneConfig, "", nested=False)
    lines += [
        "Each `search_space` entry maps a dotted training-config key to `{type, low, high}` or",
        f"`{{type: choice, values: [...]}}`; `type` is one of {', '.join(f'`{d}`' for d in DISTRIBUTIONS)}.",
        "Keys and sampled values are checked against the task's config before any trial starts.",
        "",
    ]
    lines += _section("`scheduler`", SchedulerConfig, "scheduler")
    resources = TuneConfig.__dataclass_fields__["resources"].default_factory()
    lines += _section("`resources`", type(resources), "resources", instance=resources)
    return lines


def serve_reference() -> list[str]:
    from montage.core.serve_sections import AuthConfig, CorsConfig, ModelServeConfig, MonitoringConfig, ServeConfig

    serve = ServeConfig()
    lines = [
        "## Serve configs (`montage serve --config F`)",
        "",
        "The shipped one is `serve.yaml`; `serve_config.yaml` is the same application for Ray's `serve run`.",
        "",
    ]
    lines += _section("top level", ServeConfig, "", instance=serve, nested=False)
    models = [f.name for f in dataclasses.fields(ServeConfig) if isinstance(getattr(serve, f.name), ModelServeConfig)]
    changed = {
        m: {k: v for k, v in to_dict(getattr(serve, m)).items() if v != to_dict(ModelServeConfig()).get(k)}
        for m in models
    }
    lines += _section(f"{' / '.join(f'`{m}`' for m in models)}", ModelServeConfig, "<model>")
    lines += [
        "One such section per model; "
        + "; ".join(
            f"`{m}` changes " + ", ".join(f"`{k}={v!r}`" for k, v in c.items()) for m, c in changed.items() if c
        )
        + ".",
        "",
    ]
    for name, cls in (("auth", AuthConfig), ("cors", CorsConfig), ("monitoring", MonitoringConfig)):
        lines += _section(f"`{name}`", cls, name, instance=getattr(serve, name))
    return lines


def reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m montage.cli.reference > docs/CONFIG.md`",
        "(a test fails when this file is stale). Every key can be set in the YAML file or as `key=value`",
        "on the command line (values in YAML syntax); unknown keys and wrong types fail before anything",
        "starts and name the key.",
        "",
        "- [Training configs](#training-configs-montage-train-task---config-f)",
        "- [Tune configs](#tune-configs-montage-tune-f)",
        "- [Serve configs](#serve-configs-montage-serve---config-f)",
        "",
    ]
    lines += training_reference() + tune_reference() + serve_reference()
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
