"""``montage monitor --url http://host:8000 [--watch S] [--png F]``: the ``GET /v1/monitor``
summary of a running application as tables, optionally refreshed, with a PNG of latency and
drift over time. A client only: no Ray here."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import requests

log = logging.getLogger(__name__)


def fetch(url: str, api_key: str = "", timeout: float = 30) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = requests.get(url.rstrip("/") + "/v1/monitor", headers=headers, timeout=timeout)
    r.raise_for_status()
    return r.json()


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


def format_summary(s: dict[str, Any]) -> str:
    """The summary as three tables: endpoints and stages, models, drift."""
    rows = []
    for ep, e in s.get("endpoints", {}).items():
        lat = e["latency_ms"]
        errors = ", ".join(f"{k}×{v}" for k, v in sorted(e["errors"].items())) or "-"
        rows.append(
            [
                ep,
                "(total)",
                e["requests"],
                f"{e['requests_per_s']:.2f}",
                f"{100 * e['error_rate']:.1f}%",
                errors,
                lat["p50"],
                lat["p95"],
                lat["p99"],
            ]
        )
        for name, st in e["stages"].items():
            rows.append(["", name, st["count"], "", "", "", st["p50"], st["p95"], st["p99"]])
    out = [
        f"montage monitor  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s.get('time', time.time())))}  (window "
        f"{s.get('window', 0)} requests)"
    ]
    if not s.get("enabled", True):
        out.append("monitoring is disabled on this server (monitoring.enabled=false)")
    out.append(
        _table(["endpoint", "stage", "n", "req/s", "errors", "by status", "p50 ms", "p95 ms", "p99 ms"], rows)
        if rows
        else "no requests yet"
    )
    models, drift_rows = [], []
    for task, m in s.get("models", {}).items():
        d = m.get("drift") or {}
        anomalies = ", ".join(f"{k}×{v}" for k, v in sorted(m.get("anomalies", {}).items())) or "-"
        drifted = ", ".join(d.get("drifted", [])) or "-"
        batch = m.get("batch_size", {})
        rate = f"{m.get('images_per_s', 0):.2f}"
        models.append(
            [
                task,
                m.get("version", ""),
                m.get("images", 0),
                rate,
                batch.get("mean", 0),
                batch.get("max", 0),
                m.get("reference", ""),
                drifted,
                anomalies,
            ]
        )
        for feat, f in d.get("features", {}).items():
            drift_rows.append([task, feat, f["psi"], f["ks"], f["p_value"], "DRIFTED" if f["drifted"] else "ok"])
    if models:
        out += [
            "",
            _table(
                ["model", "version", "images", "img/s", "batch mean", "batch max", "reference", "drifted", "anomalies"],
                models,
            ),
        ]
    if drift_rows:
        out += ["", _table(["model", "feature", "PSI", "KS", "p-value", "state"], drift_rows)]
    for task, side in s.get("rollout", {}).items():  # champion vs challenger (docs/rollout.md)
        out += ["", format_rollout(task, side)]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_rollout(task: str, side: dict[str, Any]) -> str:
    """One model's rollout section of /v1/monitor as a table, the tests and the verdict."""
    mode = side["mode"] + (f" {100 * side['traffic']:.0f} %" if side["mode"] == "canary" else "")
    lines = [f"{task}: {mode}, {'active' if side['active'] else 'stopped'}"]
    rows = [["arm", "version", "requests", "errors", "p50 ms", "p95 ms"]]
    for arm, a in side["arms"].items():
        lat = a["latency_ms"]
        rows.append([arm, a["version"] or "-", a["requests"], a["errors"], lat["p50"], lat["p95"]])
    widths = [max(len(_fmt(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(_fmt(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lat, err = side["latency"], side["errors"]
    lines.append(
        f"latency: medians {_fmt(lat['median'][0])} / {_fmt(lat['median'][1])} ms,"
        f" Mann-Whitney p={_fmt(lat['p_value'])}, p95 ratio CI {side.get('p95_ratio_ci') or '-'}"
    )
    lines.append(f"errors: {err['rate'][0]:.2%} / {err['rate'][1]:.2%}, Fisher p={_fmt(err['p_value'])}")
    for name, q in side.get("quality", {}).items():
        sig = "significant" if q["significant"] else "not significant"
        lines.append(
            f"quality {name}: medians {_fmt(q['median'][0])} / {_fmt(q['median'][1])}, effect {_fmt(q['effect'])},"
            f" p={_fmt(q['p_value'])} ({sig}; n={q['n'][0]}/{q['n'][1]})"
        )
    for name, a in side.get("agreement", {}).items():
        lines.append(f"shadow {name}: mean {_fmt(a['mean'])} CI {a['ci'] or '-'} (n={a['n']})")
    for arm, d in (side.get("drift") or {}).items():
        if d:
            lines.append(f"drift ({arm}): {', '.join(d.get('drifted', [])) or 'none'} over {d.get('samples', 0)}")
    lines.append(f"verdict: {side['verdict']} ({'; '.join(side['reasons'])})")
    if side.get("decision"):
        d = side["decision"]
        how = "automatically" if d.get("automatic") else "by request"
        lines.append(f"decision: {d['action']} {how}; {d.get('registry') or d.get('registry_error') or ''}")
    return "\n".join(lines)


def write_png(history: list[dict[str, Any]], path: str | Path) -> None:
    """p95 latency per endpoint and PSI per drift feature over the polls in ``history``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = history[0]["time"]
    ts = [h["time"] - t0 for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for ep in sorted({ep for h in history for ep in h.get("endpoints", {})}):
        ax1.plot(
            ts,
            [h.get("endpoints", {}).get(ep, {}).get("latency_ms", {}).get("p95", float("nan")) for h in history],
            marker="o",
            label=ep,
        )
    ax1.set_ylabel("p95 latency (ms)")
    ax1.legend(fontsize=8)
    threshold = None
    for task in sorted({t for h in history for t in h.get("models", {})}):
        feats = {f for h in history for f in ((h["models"].get(task) or {}).get("drift") or {}).get("features", {})}
        for f in sorted(feats):
            ys = [
                ((h["models"].get(task) or {}).get("drift") or {})
                .get("features", {})
                .get(f, {})
                .get("psi", float("nan"))
                for h in history
            ]
            ax2.plot(ts, ys, marker=".", label=f"{task}/{f}")
        threshold = threshold or ((history[-1]["models"].get(task) or {}).get("drift") or {}).get("psi_threshold")
    if threshold:
        ax2.axhline(threshold, color="red", linestyle="--", label="PSI threshold")
    ax2.set_ylabel("PSI")
    ax2.set_xlabel("seconds")
    ax2.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def monitor(
    url: str,
    watch: float = 0,
    png: str | None = None,
    api_key: str = "",
    echo: Callable[[str], None] = print,
    polls: int = 0,
) -> int:
    """Print the summary (every ``watch`` seconds until Ctrl-C, or ``polls`` times); keep the
    history for ``png``."""
    history: list[dict[str, Any]] = []
    try:
        while True:
            s = fetch(url, api_key)
            history.append(s)
            echo(format_summary(s))
            if png:
                write_png(history, png)
            if watch <= 0 or (polls and len(history) >= polls):
                break
            echo("")
            time.sleep(watch)
    except KeyboardInterrupt:
        pass
    except (requests.RequestException, ValueError) as exc:
        log.error("no monitoring summary from %s/v1/monitor: %s", url.rstrip("/"), exc)
        return 2
    if png:
        log.info("wrote %s", png)
    return 0
