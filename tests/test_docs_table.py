"""The benches' ``--docs``: a bench replaces its own block of a docs file, nothing else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _docs_table():
    spec = importlib.util.spec_from_file_location("docs_table", ROOT / "bench" / "docs_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_block_replaces_only_its_block(tmp_path: Path) -> None:
    dt = _docs_table()
    doc = tmp_path / "x.md"
    doc.write_text(
        "intro\n<!-- bench:a -->\nold figures\n<!-- /bench:a -->\nmiddle\n<!-- bench:b -->\nB\n<!-- /bench:b -->\n"
    )
    dt.write_block(doc, "a", "p50  12.5 ms\n", "python bench/a.py --quick")
    text = doc.read_text()
    assert "old figures" not in text and "p50  12.5 ms" in text and "`python bench/a.py --quick` (" in text
    assert text.startswith("intro\n") and "middle\n<!-- bench:b -->\nB\n<!-- /bench:b -->" in text
    again = text
    dt.write_block(doc, "a", "p50  12.5 ms\n", "python bench/a.py --quick")
    assert doc.read_text() == again  # a rerun with the same figures changes nothing (same day)
    with pytest.raises(ValueError, match="no block <!-- bench:c -->"):
        dt.write_block(doc, "c", "", "python bench/c.py")


@pytest.mark.parametrize(
    "doc, name", [("docs/reliability.md", "restart_bench"), ("docs/monitoring.md", "monitoring_bench")]
)
def test_the_docs_hold_the_benches_blocks(doc: str, name: str) -> None:
    text = (ROOT / doc).read_text()
    assert text.count(f"<!-- bench:{name} -->") == 1 and text.count(f"<!-- /bench:{name} -->") == 1
    source = (ROOT / "bench" / f"{name}.py").read_text()
    assert '"--docs"' in source and f"'{name}'" in source  # the bench writes this block
