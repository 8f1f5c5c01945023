"""Commands on data and on what a model does with it: ``data`` (``data check``, ``data catflw``, ...)
and ``evaluate``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from montage.cli.common import ADDRESS_HELP, TRACKING_HELP, load_config_for

log = logging.getLogger("montage")


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="montage data check",
        description="Read every sample of a task's data config once through the task's own dataset code; "
        "write report.json and a sample grid per split; exit 1 when too many samples are rejected.",
    )
    p.add_argument("task")
    p.add_argument("--config", help="YAML config file (or a shipped config name)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.source=coco data.images=DIR")
    p.add_argument("--out", default="data_check", help="report folder (default data_check/)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes reading samples (0: this one)")
    p.add_argument(
        "--threshold", type=float, default=0.01, help="largest share of rejected samples that passes (default 0.01)"
    )
    p.add_argument("--grid", type=int, default=16, help="random samples shown per split in samples_<split>.png")
    p.add_argument("--seed", type=int, default=0, help="which samples the grid shows")
    p.add_argument(
        "--ray",
        action="store_true",
        help="read with Ray tasks on a Ray cluster (--address) instead of local loader workers; the data paths "
        "must be the same on every node",
    )
    p.add_argument("--address", help=ADDRESS_HELP + "; implies --ray")
    p.add_argument(
        "--chunk", type=int, default=0, help="--ray: samples per Ray task (default: about 4 tasks per CPU, 8..256)"
    )
    return p


def data_check(argv: list[str]) -> int:
    """``montage data check <task> [--config F] [k=v ...]``: 0 when it passes, 1 past the threshold."""
    from montage.core.registry import TASKS
    from montage.platform.datacheck import format_table, run_check
    from montage.platform.fingerprint import absolute_data_paths

    parser = _check_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]  # key=value after options
    if [e for e in extra if e not in args.overrides]:
        parser.error(f"unrecognized arguments: {' '.join(e for e in extra if e not in args.overrides)}")
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.chunk and not (args.ray or args.address):
        parser.error("--chunk is for --ray")
    cfg = load_config_for(args.task, args.config, args.overrides)
    absolute_data_paths(cfg.data)  # the report names files absolutely; Ray workers open the same ones
    read, reader, workers = None, "loader", args.workers
    if args.ray or args.address:
        from montage.launch.datacheck import cluster_cpus, ray_read
        from montage.launch.session import ensure_ray

        ensure_ray(args.address)
        read, reader, workers = ray_read(args.chunk), "Ray tasks", cluster_cpus()
    task = TASKS.get(args.task)(cfg)
    sources = task.check_sources()
    report = run_check(
        args.task,
        str(getattr(cfg.data, "source", "")),
        sources,
        args.out,
        workers=workers,
        threshold=args.threshold,
        grid=args.grid,
        seed=args.seed,
        read=read,
        reader=reader,
    )
    print(format_table(report.as_dict()))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0 if report.passed else 1


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    from montage.core.registry import DATA_COMMANDS

    if args.name == "check":
        return data_check(extra)
    return DATA_COMMANDS.get(args.name)(extra)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from montage.core.sources import ModelSource
    from montage.platform.evaluation import comparison_table, evaluate_loop, evaluation_setup, write_report
    from montage.tracking.evaluation import log_evaluation
    from montage.tracking.sources import resolve_source

    source = ModelSource.parse(args.source, "--source") if args.source else ModelSource.champion(args.task)
    resolved = resolve_source(source, args.tracking_uri or "")
    loop = evaluation_setup(resolved.checkpoint, task=args.task, data_overrides=args.data)
    if resolved.exported is not None:  # an ONNX (OpenVINO) variant: ONNX Runtime (OpenVINO) runs the exported network
        from montage.tracking.variants import exported_net

        loop.m.nets[loop.task.export_net] = loop.task.from_exported(exported_net(resolved.exported))
    ev = evaluate_loop(loop, worst=args.worst)
    files = write_report(loop, ev, args.out)
    table = comparison_table(ev)
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    print(f"{int(ev.metrics['val/samples'])} images; report: {', '.join(str(p) for p in files.values())}")
    if args.track:
        rid = log_evaluation(loop.cfg, ev, args.out, source, args.tracking_uri or "")
        print(f"MLflow evaluation run {rid}")
    return 0


def register(sub: Any) -> None:
    dt = sub.add_parser(
        "data",
        add_help=False,  # `montage data check --help` is the check's own help
        help="check or prepare a dataset: `montage data check <task> [k=v ...]`, `montage data catflw --src --out`",
    )
    dt.add_argument("name", help="check, or a preparation command (catflw, ...)")
    dt.set_defaults(func=cmd_data, wants_extra=True)

    ev = sub.add_parser(
        "evaluate", help="score a model on a dataset against the task's baselines; a report folder + an MLflow run"
    )
    ev.add_argument("task")
    ev.add_argument(
        "--source",
        help="models:/montage-<task>@champion (default), models:/<name>/<version>, a checkpoint (local or s3://…), "
        "an exported .onnx file or an OpenVINO IR .xml",
    )
    ev.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="data-section overrides of the checkpoint's config, e.g. source=folder images=DIR masks=DIR "
        "(default: its validation split)",
    )
    ev.add_argument("--out", default="evaluation", help="report folder (default evaluation/)")
    ev.add_argument("--worst", type=int, default=8, help="worst images shown in worst.png")
    ev.add_argument("--track", action=argparse.BooleanOptionalAction, default=True, help="log an MLflow evaluation run")
    ev.add_argument("--tracking-uri", help=TRACKING_HELP)
    ev.set_defaults(func=cmd_evaluate)
