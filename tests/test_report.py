"""``montage report`` built from a real tiny sweep (two harmonization trials, one of them stopped early
by ASHA), from its runs and from the version it registered; rendered in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import mlflow
import pytest

from montage.cli import main
from montage.tracking import report as rd
from montage.tracking.report_page import build

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def sweep(harmonization_sweep):
    """conftest's sweep: two harmonization trials, the second stopped early by ASHA."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", harmonization_sweep.uri)
        yield harmonization_sweep.tmp, harmonization_sweep.uri, harmonization_sweep.result


def test_sweep_report_shows_every_trial(sweep, capsys) -> None:
    tmp, uri, result = sweep
    assert not result.errors and len(result.table) == 2
    assert main(["report", "sweep", "rep", "--output", str(tmp / "out"), "--tracking-uri", uri]) == 0
    page = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert page == (tmp / "out" / "report.html").resolve() and page.is_file()
    text = page.read_text()
    # self-contained: every image is embedded, nothing is fetched
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)
    assert len(re.findall(r'src="data:image/png;base64,', text)) >= 5  # curves, importance, parallel, 2+ grids
    for png in ("curves.png", "param_importance.png", "parallel_coordinates.png", "samples.png"):
        assert (tmp / "out" / png).stat().st_size > 5_000, png

    data = rd.load_sweep("rep", uri)
    assert data.metric == "val/fmse" and data.mode == "min" and set(data.space) == {"optim.lr", "loss.mse"}
    by_id = {t.mlflow_run_id: t for t in result.table}
    assert {r.run_id for r in data.runs} == set(by_id)
    stopped = [r for r in data.runs if r.stopped_early]  # the wrecked trial: ASHA stopped it at epoch 1 of 3
    assert len(stopped) == 1 and stopped[0].params["optim.lr"] == "10.0"
    assert 1 <= stopped[0].epochs < 3 and by_id[stopped[0].run_id].epochs < 3  # (its stop may land after epoch 2)
    assert f"× stopped early: {stopped[0].label}" in text
    # the table: one row per trial, each trial's best fMSE and its epoch, the composite baseline beside it
    rows = re.findall(r'<tr class="[^"]*" data-run="([0-9a-f]+)">(.*?)</tr>', text)
    assert [rid for rid, _ in rows][0] == result.best.mlflow_run_id  # best first, and marked
    assert "★" in rows[0][1] and len(rows) == 2
    for rid, row in rows:
        run = next(r for r in data.runs if r.run_id == rid)
        epoch, best = run.best("val/fmse", "min")
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert f"{best:.4g}" in cells and str(epoch) in cells
        baseline = run.value_at("val/baseline_fmse", epoch)
        assert baseline and f"{baseline:.4g}" in cells and f"{best / baseline:.4g}" in cells
    assert by_id[result.best.mlflow_run_id].best("val/fmse") == pytest.approx(
        data.best_run().best("val/fmse", "min")[1]
    )
    # the same validation images: the grids of the last epoch both trials logged (1, or 2 when ASHA's stop
    # landed after epoch 2), at the size the trials logged them
    shared = max(set.intersection(*(set(r.sample_epochs) for r in data.runs)))
    assert shared == min(r.epochs for r in data.runs)
    assert text.count(f"epoch {shared} · val/fmse") >= 2
    grids = list((tmp / "out" / "samples").rglob(f"epoch_{shared:03d}.png"))
    assert len(grids) == 2
    from PIL import Image

    assert len({Image.open(g).size for g in grids}) == 1
    # logged as an artifact of the sweep's parent run
    client = mlflow.MlflowClient(tracking_uri=uri)
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.html", "report/curves.png", "report/samples.png"} <= logged


def test_runs_and_versions_reports(sweep) -> None:
    tmp, uri, result = sweep
    ids = [t.mlflow_run_id for t in result.table]
    runs = rd.load_runs(ids, uri)
    assert runs.metric == "val/fmse" and [r.run_id for r in runs.runs] == ids
    assert {"optim.lr", "loss.mse"} <= set(runs.varied_params())  # found by comparing the runs' configs
    text = build(runs, tmp / "runs").read_text()
    assert text.count("data-run=") == 2 and "optim.lr" in text

    versions = rd.load_versions("harmonization", uri=uri)
    assert [r.label for r in versions.runs] == ["v1"] and "@champion" in versions.runs[0].note
    assert versions.runs[0].run_id == result.best.mlflow_run_id
    page = build(versions, tmp / "versions")
    assert "v1 (@champion) ★" in page.read_text()
    with pytest.raises(ValueError, match="has no version 7"):
        rd.load_versions("harmonization", ["7"], uri)
    assert main(["report", "sweep", "nope", "--tracking-uri", uri]) == 2  # a one-line error, exit 2


@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)
def test_report_renders_in_chromium(sweep, tmp_path) -> None:
    """Every figure decodes and the page lays out; ``MONTAGE_REPORT_SCREENSHOT=docs/report.png``
    also saves the screenshot of the README and docs/tuning.md (the test writes only under tmp_path)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp, uri, result = sweep
    page = build(rd.load_sweep("rep", uri), tmp_path / "out")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1800",
                 "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        browser.get(page.as_uri())
        sizes = browser.execute_script(
            "return [...document.images].map(i => "
            "[i.alt, i.complete && i.naturalWidth, i.getBoundingClientRect().width])"
        )
        assert len(sizes) >= 5 and all(w and shown > 50 for _, w, shown in sizes), sizes
        assert browser.execute_script("return document.querySelectorAll('tr[data-run]').length") == 2
        shot = tmp_path / "report.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("MONTAGE_REPORT_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["MONTAGE_REPORT_SCREENSHOT"])
    finally:
        browser.quit()
