"""``montage report``: one HTML page (+ PNGs) from MLflow for a sweep, a set of runs or a task's
registry versions — learning curves on shared axes, parameter importance and parallel coordinates,
the same validation images side by side, each run's best metric against its baseline.

    montage report sweep <sweep name | parent run id>     # also logged as report/ of the parent run
    montage report runs <run id> <run id> ...
    montage report versions <task> [--versions 3 4]
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from montage.cli.common import TRACKING_HELP

log = logging.getLogger("montage")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "report"


def cmd_report(args: argparse.Namespace) -> int:
    from montage.tracking import report as rd
    from montage.tracking.report_page import build, log_to_parent

    uri = args.tracking_uri or ""
    if args.kind == "sweep":
        data = rd.load_sweep(args.target, uri)
        default = f"sweep-{data.facts.get('sweep') or args.target}"
    elif args.kind == "runs":
        data = rd.load_runs(args.run_ids, uri)
        default = "runs-" + "-".join(r[:8] for r in args.run_ids[:4])
    else:
        data = rd.load_versions(args.task, args.versions, uri)
        default = f"versions-{args.task}"
    out = Path(args.output or Path("reports") / _slug(default))
    page = build(data, out)
    if data.parent_run_id and not getattr(args, "no_log", False):
        log_to_parent(data, out)
        log.info("logged as artifacts report/ of the sweep's parent run %s", data.parent_run_id)
    print(page.resolve())
    return 0


def register(sub: Any) -> None:
    rp = sub.add_parser(
        "report", help="an HTML report (+ PNGs) of a sweep, runs or registry versions: curves, parameters, samples"
    )
    kinds = rp.add_subparsers(dest="kind", required=True)
    sw = kinds.add_parser("sweep", help="a sweep by name or parent run id (logged as report/ of its parent run)")
    sw.add_argument("target", help="the sweep's name (montage tune name=...) or its MLflow parent run id")
    sw.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    rs = kinds.add_parser("runs", help="a set of MLflow runs by id")
    rs.add_argument("run_ids", nargs="+", help="MLflow run ids")
    vs = kinds.add_parser("versions", help="a task's registered model versions (montage-<task>)")
    vs.add_argument("task")
    vs.add_argument("--versions", nargs="+", help="only these versions (default: all)")
    for p in (sw, rs, vs):
        p.add_argument("--output", help="folder for report.html and its PNGs (default reports/<name>)")
        p.add_argument("--tracking-uri", help=TRACKING_HELP)
        p.set_defaults(func=cmd_report)
