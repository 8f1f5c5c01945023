"""The ``montage report`` page: one self-contained HTML file (every figure embedded as a data URI)
plus the same figures as PNGs beside it, drawn with matplotlib from a :class:`ReportData`.

- the table: each run's best monitored metric (and its epoch) against the task's no-learning
  baseline logged beside it (``val/baseline_*``), the best run marked;
- learning curves of every run on shared axes (the metric, ``train/total``, ``val/loss`` by epoch),
  runs stopped early by the scheduler dashed and ending in ×, the baseline as a grey line;
- parameter importance (Optuna's fANOVA over the runs' best values) and parallel coordinates;
- the validation sample grids of every run side by side (the same first validation batch), at
  each run's best epoch and at the last epoch every run reached.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from montage.tracking.report import ReportData, RunData, download_sample

log = logging.getLogger(__name__)

FILE = "report.html"


def _num(text: Any) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def curves(data: ReportData, path: Path) -> Path | None:
    """Every run's metric by epoch, one panel per metric, all runs on the same axes."""
    keys = [k for k in (data.metric, "train/total", "val/loss") if any(r.history.get(k) for r in data.runs)]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), sharex=True, squeeze=False)
    best = data.best_run()
    for color, run in zip(_colors(len(data.runs)), data.runs):
        for ax, key in zip(axes[0], keys):
            pts = run.history.get(key, [])
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "--" if run.stopped_early else (":" if run.status == "failed" else "-")
            width = 2.6 if run is best else 1.4
            ax.plot(xs, ys, style, color=color, lw=width, marker="o", ms=3, label=run.label)
            if run.stopped_early:
                ax.plot(xs[-1], ys[-1], "x", color=color, ms=10, mew=2.5)
    baseline = [v for r in data.runs for _, v in r.history.get(data.baseline_metric, [])]
    if baseline:
        axes[0][0].axhline(sum(baseline) / len(baseline), color="0.45", ls="-.", lw=1.2, label="baseline")
    for ax, key in zip(axes[0], keys):
        ys = [v for r in data.runs for _, v in r.history.get(key, [])]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 5:  # a diverged run would flatten the others
            ax.set_yscale("log")
        ax.set_title(key + (f" ({data.mode})" if key == data.metric else ""))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), title="× stopped early")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _param_columns(data: ReportData, runs: list[RunData]) -> dict[str, list[Any]]:
    cols = {}
    for key in data.varied_params():
        vals = [r.params.get(key, "") for r in runs]
        nums = [_num(v) for v in vals]
        cols[key] = nums if all(n is not None for n in nums) else [str(v) for v in vals]
    return {k: v for k, v in cols.items() if len(set(v)) > 1}


def importances(data: ReportData) -> tuple[dict[str, float], str]:
    """Parameter → importance for the monitored metric over the runs that scored: Optuna's fANOVA
    over an in-memory study of the runs (Spearman's |ρ| when fANOVA cannot run)."""
    runs = [r for r in data.runs if r.best(data.metric, data.mode) is not None]
    cols = _param_columns(data, runs)
    if len(runs) < 2 or not cols:
        return {}, ""
    values = [r.best(data.metric, data.mode)[1] for r in runs]
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists: dict[str, Any] = {}
        for key, vals in cols.items():
            if isinstance(vals[0], str):
                dists[key] = optuna.distributions.CategoricalDistribution(sorted(set(vals)))
            else:
                log_scale = data.space.get(key, "").startswith("loguniform") and min(vals) > 0
                dists[key] = optuna.distributions.FloatDistribution(min(vals), max(vals), log=log_scale)
        study = optuna.create_study(direction="maximize" if data.mode == "max" else "minimize")
        for i, value in enumerate(values):
            params = {k: cols[k][i] for k in cols}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, target=None)), "Optuna fANOVA"
    except Exception as exc:  # noqa: BLE001 - fall back to a rank correlation
        log.info("fANOVA importance unavailable (%s): Spearman's |rho| instead", exc)
    from scipy.stats import spearmanr

    out = {}
    for key, vals in cols.items():
        codes = vals if not isinstance(vals[0], str) else [sorted(set(vals)).index(v) for v in vals]
        rho = spearmanr(codes, values).statistic
        out[key] = 0.0 if rho != rho else abs(float(rho))
    return dict(sorted(out.items(), key=lambda kv: -kv[1])), "Spearman |ρ|"


def importance_plot(data: ReportData, path: Path) -> Path | None:
    imp, method = importances(data)
    if not imp:
        return None
    plt = _plt()
    keys = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(keys) + 1.2))
    ax.barh(keys, [imp[k] for k in keys], color="#4a78b5")
    ax.set_xlabel(f"importance for {data.metric} ({method})")
    ax.set_title("parameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parallel_plot(data: ReportData, path: Path) -> Path | None:
    """One line per run through every varied parameter and the best metric, each axis scaled to its
    range (log for a loguniform parameter), coloured by the metric; stopped-early runs dashed."""
    runs = [r for r in data.runs if r.best(data.metric, data.mode) is not None]
    cols = _param_columns(data, runs)
    if len(runs) < 2 or not cols:
        return None
    plt = _plt()
    values = [r.best(data.metric, data.mode)[1] for r in runs]
    axes_vals = {**cols, f"best {data.metric}": values}
    scaled, ticks = [], []
    for key, vals in axes_vals.items():
        if isinstance(vals[0], str):
            cats = sorted(set(vals))
            pos = [cats.index(v) / max(1, len(cats) - 1) for v in vals]
            ticks.append((cats[0], cats[-1]))
        else:
            logs = data.space.get(key, "").startswith("loguniform") and min(vals) > 0
            f = (lambda v: math.log10(v)) if logs else (lambda v: v)
            lo, hi = f(min(vals)), f(max(vals))
            pos = [(f(v) - lo) / (hi - lo) if hi > lo else 0.5 for v in vals]
            ticks.append((_fmt(min(vals)), _fmt(max(vals))))
        scaled.append(pos)
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(axes_vals)), 4))
    cmap = plt.get_cmap("viridis" if data.mode == "max" else "viridis_r")
    lo, hi = min(values), max(values)
    for i, run in enumerate(runs):
        c = cmap((values[i] - lo) / (hi - lo) if hi > lo else 1.0)
        ax.plot(range(len(axes_vals)), [s[i] for s in scaled], "--" if run.stopped_early else "-", color=c, lw=2)
        ax.annotate(run.label, (len(axes_vals) - 1, scaled[-1][i]), xytext=(6, 0), textcoords="offset points",
                    fontsize=7, va="center")  # fmt: skip
    for x, (low, high) in enumerate(ticks):
        ax.axvline(x, color="0.3", lw=1)
        ax.text(x, -0.06, low, ha="center", va="top", fontsize=7)
        ax.text(x, 1.06, high, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(axes_vals)), list(axes_vals), fontsize=8)
    ax.tick_params(axis="x", pad=18)
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_title("parallel coordinates (colour: best metric, dashed: stopped early)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def sample_rows(data: ReportData, out: Path) -> list[tuple[str, list[tuple[RunData, int, Path]]]]:
    """The grids to show: each run at its best epoch, then every run at the last epoch all reached."""
    rows = []
    best_row = []
    for run in data.runs:
        b = run.best(data.metric, data.mode)
        epochs = [e for e in run.sample_epochs if b is None or e <= b[0]] or run.sample_epochs
        if epochs:
            got = download_sample(data, run, epochs[-1], out / "samples" / run.label)
            if got:
                best_row.append((run, epochs[-1], got))
    if best_row:
        rows.append(("at each run's best epoch", best_row))
    common = set.intersection(*(set(r.sample_epochs) for r in data.runs)) if data.runs else set()
    if common and len(data.runs) > 1:
        e = max(common)
        same = [(r, e, download_sample(data, r, e, out / "samples" / r.label)) for r in data.runs]
        if any(epoch != e for _, epoch, _ in best_row):
            rows.append((f"at epoch {e}, the last every run reached", [(r, e, p) for r, e, p in same if p]))
    return rows


def samples_plot(rows: list[tuple[str, list[tuple[RunData, int, Path]]]], metric: str, path: Path) -> Path | None:
    if not rows:
        return None
    plt = _plt()
    n = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(2.6 * n, 3.0 * len(rows)), squeeze=False)
    for (title, cells), line in zip(rows, axes):
        for ax in line:
            ax.axis("off")
        for ax, (run, epoch, png) in zip(line, cells):
            ax.imshow(plt.imread(png))
            ax.set_title(f"{run.label} · epoch {epoch}\n{metric} {_fmt(run.value_at(metric, epoch))}", fontsize=8)
        line[0].text(-0.1, 0.5, title, transform=line[0].transAxes, rotation=90, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;padding:0 16px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.best td{background:#e8f4e8;font-weight:600}
img{max-width:100%}.row{display:flex;gap:14px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0;text-align:center;font-size:12px}figure img{image-rendering:pixelated;width:200px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}dt{color:#666}dd{margin:0}"""


def table_html(data: ReportData) -> str:
    keys = data.varied_params()
    base = data.baseline_metric
    best = data.best_run()
    head = ["run", "status", "epochs", *keys, f"best {data.metric}", "epoch", f"baseline ({base})", "÷ baseline"]
    out = [
        "<table><tr>"
        + "".join(f'<th class="{"l" if i < 2 else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
        + "</tr>"
    ]
    order = sorted(data.runs, key=lambda r: _sort_key(r, data))
    for run in order:
        b = run.best(data.metric, data.mode)
        baseline = run.value_at(base, b[0]) if b else None
        ratio = b[1] / baseline if b and baseline else None
        label = run.label + (f" ({run.note})" if run.note else "") + (" ★" if run is best else "")
        params = [run.params.get(k, "") for k in keys]
        cells = [label, run.status, str(run.epochs), *[p if _num(p) is None else _fmt(_num(p)) for p in params]]
        cells += [_fmt(b[1]) if b else "—", str(b[0]) if b else "—", _fmt(baseline), _fmt(ratio)]
        tds = "".join(f'<td class="{"l" if i < 2 else ""}">{html.escape(str(c))}</td>' for i, c in enumerate(cells))
        out.append(f'<tr class="{"best" if run is best else ""}" data-run="{run.run_id}">{tds}</tr>')
    return "\n".join(out) + "</table>"


def _sort_key(run: RunData, data: ReportData) -> tuple[int, float]:
    b = run.best(data.metric, data.mode)
    if b is None:
        return (1, 0.0)
    return (0, -b[1] if data.mode == "max" else b[1])


def _stopped_note(data: ReportData) -> str:
    stopped = [r.label for r in data.runs if r.stopped_early]
    if not stopped:
        return ""
    return f"<p>× stopped early: {html.escape(', '.join(stopped))} (by the scheduler; dashed lines)</p>"


def build(data: ReportData, out: Path) -> Path:
    """Write ``out/report.html`` and its PNGs; returns the HTML file."""
    out.mkdir(parents=True, exist_ok=True)
    figs = {
        "curves": curves(data, out / "curves.png"),
        "importance": importance_plot(data, out / "param_importance.png"),
        "parallel": parallel_plot(data, out / "parallel_coordinates.png"),
    }
    rows = sample_rows(data, out)
    figs["samples"] = samples_plot(rows, data.metric, out / "samples.png")
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in data.facts.items() if v)
    facts += f"<dt>metric</dt><dd>{html.escape(data.metric)} ({data.mode})</dd>"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>montage report: {html.escape(data.title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>montage report: {html.escape(data.title)}</h1><dl>{facts}</dl>",
        f'<h2 id="table">Best {html.escape(data.metric)} of each run against its baseline</h2>',
        table_html(data),
        "<p>baseline: the task's no-learning method on the same validation images (—: the task logs none).</p>",
        '<h2 id="curves">Learning curves</h2>',
        _img(figs["curves"], "learning curves") or "<p>no metric history logged.</p>",
        _stopped_note(data),
        '<h2 id="params">Parameters</h2><div class="row">',
        _img(figs["importance"], "parameter importance"),
        _img(figs["parallel"], "parallel coordinates"),
        "</div>" + ("" if figs["importance"] else "<p>fewer than two scored runs or no varied parameter.</p>"),
        '<h2 id="samples">Validation samples (the same first validation batch in every run)</h2>',
    ]
    for title, cells in rows:
        parts.append(f"<h3>{html.escape(title)}</h3><div class='row'>")
        for run, epoch, png in cells:
            caption = f"{run.label} · epoch {epoch} · {data.metric} {_fmt(run.value_at(data.metric, epoch))}"
            parts.append(f"<figure>{_img(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    if not rows:
        parts.append("<p>no sample grids logged (train.sample_every=0?).</p>")
    parts.append("</body></html>")
    page = out / FILE
    page.write_text("\n".join(parts))
    log.info("report: %s (%d runs)", page, len(data.runs))
    return page


def log_to_parent(data: ReportData, out: Path) -> None:
    """Log the report folder as ``report/`` of the sweep's parent run."""
    import mlflow

    from montage.tracking.runs import resolve_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(data.tracking_uri))
    client.log_artifacts(data.parent_run_id, str(out), "report")
