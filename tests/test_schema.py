"""Every ``montage.*`` MLflow tag name lives in montage/core/schema.py: a tag literal anywhere else
in the package fails here (module, logger and entry-point names, ``montage.<subpackage>…``, pass)."""

from __future__ import annotations

import ast
from pathlib import Path

from montage.core import schema

ROOT = Path(__file__).resolve().parents[1] / "montage"
MODULES = {
    p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()
}
ENTRY_POINT_GROUPS = {"montage.tasks", "montage.data"}  # pyproject.toml's entry-point groups


def _tag_literals(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of each string (or f-string start) in ``path`` that names a ``montage.`` tag."""
    found = set()  # an f-string's leading part is seen twice: as the f-string and as its constant
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = str(node.values[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        if not text.startswith("montage.") or text in ENTRY_POINT_GROUPS:
            continue
        head = text[len("montage.") :].split(".", 1)[0]
        if head not in MODULES:
            found.add((node.lineno, text))
    return sorted(found)


def test_no_tag_name_is_written_outside_the_schema() -> None:
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{line}: {text!r}"
        for path in sorted(ROOT.rglob("*.py"))
        if path != ROOT / "core" / "schema.py"
        for line, text in _tag_literals(path)
    ]
    assert not offenders, "use montage.core.schema for these tag names:\n" + "\n".join(offenders)


def test_the_guard_sees_a_tag_literal(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        'import logging\nlog = logging.getLogger("montage.serve")\n'
        'tags = {"montage.metric": "val/iou", f"montage.data.{1}": 1}\nGROUP = "montage.tasks"\n'
    )
    assert _tag_literals(sample) == [(3, "montage.data."), (3, "montage.metric")]


def test_the_schema_names_each_tag_once_and_splits_params() -> None:
    names = {k: v for k, v in vars(schema).items() if k.isupper() and isinstance(v, str) and v.startswith("montage.")}
    assert len(set(names.values())) == len(names)  # no tag under two names
    # sweep parameters (YAML, on a version a sweep registered) and a parameter count (on a variant) are two tags
    assert schema.SWEEP_PARAMS != schema.PARAMS and schema.PARAMS == "montage.params"
    assert (
        schema.logged_metric("val/iou") == "montage.val/iou"
        and schema.data_samples("val") == "montage.data.val_samples"
    )
