"""The benches' ``--docs``: a bench replaces its own block of a docs file, nothing else."""

from __future__ import annotations

import importlib.util
import re
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


def test_tee_keeps_what_the_bench_prints_not_what_other_threads_print(capsys) -> None:
    """Ray's driver forwards its workers' log lines to standard output from a thread of its own: they
    reach the terminal but not the docs."""
    import threading

    dt = _docs_table()
    with dt.Tee() as out:
        print("p50  12 ms")
        t = threading.Thread(target=lambda: print("(raylet) Task ServeController.listen_for_change failed"))
        t.start()
        t.join()
        print("p95  15 ms")
    assert out.text == "p50  12 ms\np95  15 ms\n"
    assert "(raylet)" in capsys.readouterr().out


def _blocks() -> list[tuple[str, str]]:
    """Every ``<!-- bench:NAME -->`` block of the docs, as (docs file, NAME)."""
    found = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        pairs = re.findall(r"<!-- bench:([\w-]+) -->.*?<!-- /bench:\1 -->", doc.read_text(), re.S)
        found += [(f"docs/{doc.name}", name) for name in pairs]
    return found


def test_the_benches_blocks_are_where_the_benches_write() -> None:
    names = {name for _, name in _blocks()}
    for expected in (
        "restart_bench",
        "monitoring_bench",
        "quality",
        "train_bench_quick",
        "serve_bench",
        "cluster_bench",
    ):
        assert expected in names, f"no docs file holds the block bench:{expected}"


@pytest.mark.parametrize("doc, name", _blocks(), ids=lambda v: v)
def test_every_block_is_written_by_a_bench(doc: str, name: str) -> None:
    text = (ROOT / doc).read_text()
    assert text.count(f"<!-- bench:{name} -->") == 1 and text.count(f"<!-- /bench:{name} -->") == 1
    writers = [
        b.name
        for b in (ROOT / "bench").glob("*.py")
        if '"--docs"' in (src := b.read_text())
        and re.search(f"[\"']{doc}[\"']", src)
        and re.search(f"[\"']{name}[\"']", src)
    ]
    assert writers, f"no bench names both {doc} and the block {name} (and has --docs): a figure copied by hand?"
