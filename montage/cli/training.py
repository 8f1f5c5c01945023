"""Commands that train: train, tune, submit, predict, config, tasks, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from montage.cli.common import ADDRESS_HELP, LAUNCHED_AT, fmt, load_config_for

log = logging.getLogger("montage")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"scaling.workers={args.workers}")
    if args.gpus:
        overrides.append("scaling.gpus=true")
    cfg = load_config_for(args.task, args.config, overrides)
    if cfg.cv.folds and not args.resume:  # K-fold cross-validation (--resume continues the one fold cv.fold)
        from montage.cli.toolbox import run_cv_command

        return run_cv_command(cfg, args.no_ray, args.address)
    if args.no_ray:
        from montage.launch.local import fit_local

        summary = fit_local(cfg, resume=args.resume, launched_at=LAUNCHED_AT)
    else:
        from montage.launch.train import fit_ray

        summary = fit_ray(cfg, resume=args.resume, address=args.address, launched_at=LAUNCHED_AT)
    print(json.dumps(_summary(summary), indent=2, default=str))
    return 1 if summary.error else 0


def _summary(s: Any) -> dict[str, Any]:
    """A RunSummary as the JSON ``montage train`` prints: the metrics worth reading, each kept checkpoint's epoch."""
    import dataclasses

    keep = ("val/", "best/", "train/total", "epoch", "time/", "mem/")

    def kept(m: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (m or {}).items() if k.startswith(keep)}

    out = {k: v for k, v in dataclasses.asdict(s).items() if v not in (None, [])}
    out["metrics"] = kept(s.metrics)
    if s.checkpoints:
        out["checkpoints"] = [
            {"path": c.path, "epoch": c.metrics.get("epoch"), "metrics": kept(c.metrics)} for c in s.checkpoints
        ]
    return out


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from montage.core.registry import TASKS
    from montage.platform.inference import load_for_inference

    task_cls = TASKS.get(args.task)
    parser = argparse.ArgumentParser(prog=f"montage predict {args.task}")
    task_cls.add_predict_args(parser)
    targs = parser.parse_args(extra)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task, nets = load_for_inference(args.checkpoint, task=args.task, device=device)
    written = task.predict_cli(nets, targs, device)
    print(f"wrote {len(written)} file(s) to {targs.output}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from montage.core.registry import TASKS

    for name in TASKS.names():
        cls = TASKS.get(name)
        print(f"{name:14s} monitor={cls.monitor[0]} ({cls.monitor[1]})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (defaults + file + overrides) as YAML."""
    import yaml

    from montage.core.config import to_dict

    cfg = load_config_for(args.task, args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from montage.launch.tune import SweepInterrupted, load_tune_config, run_sweep

    overrides = list(args.overrides)
    if args.promote:
        overrides.append(f"promote={args.promote}")
    tcfg, base, params = load_tune_config(args.config, overrides)
    try:
        result = run_sweep(tcfg, base, params, resume=args.resume, address=args.address)
    except SweepInterrupted as exc:
        print(str(exc).replace("<config>", str(args.config)))
        return 130  # the shell's code for an interrupt
    print(format_sweep(result, tcfg.metric))
    if result.table and all(t.error for t in result.table):
        log.error("every trial failed; the first error: %s", result.errors[0])
        return 1
    return 0


def format_sweep(result: Any, metric: str) -> str:

    keys = list(result.table[0].params) if result.table else []
    head = ["trial", "status", "epochs", *keys, f"best {metric}"]
    rows = [
        [t.name, t.status.value, str(t.epochs), *[fmt(t.params[k]) for k in keys], fmt(t.best(metric))]
        for t in result.table
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = [
        f"sweep {result.name} (MLflow parent run {result.parent_run_id})",
        "  ".join(h.ljust(w) for h, w in zip(head, widths)),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if result.best:
        lines.append(f"best: {result.best.name} {metric}={fmt(result.best.best(metric))}")
    if result.registered:
        r = result.registered
        lines.append(
            f"registered {r.name} version {r.version}" + (" → @champion" if r.promoted else " (champion kept)")
        )
    lines.append(f"compare the trials: montage report sweep {result.name}")
    return "\n".join(lines)


def cmd_submit(args: argparse.Namespace, extra: list[str]) -> int:
    from montage.launch.submit import submit

    return submit(
        [args.command, *extra],
        args.address,
        args.working_dir,
        args.tracking_uri or "",
        follow=not args.no_follow,
        python=args.python,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from montage.demo import run_demo

    return run_demo(Path(args.out), workers=args.workers)


def register(sub: Any) -> None:
    t = sub.add_parser("train", help="train a task (Ray Train TorchTrainer, or in-process with --no-ray)")
    t.add_argument("task")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 loss.dice=0.5")
    t.add_argument(
        "--workers", type=int, help="number of DDP workers (scaling.workers; train.batch_size stays per worker)"
    )
    t.add_argument("--gpus", action="store_true", help="one GPU per worker (scaling.gpus=true)")
    t.add_argument("--resume", help="a run folder <storage>/<name> to continue from its latest checkpoint")
    t.add_argument(
        "--no-ray",
        action="store_true",
        help="run the loop in this process (debugging), at the global batch of scaling.workers × train.batch_size",
    )
    t.add_argument(
        "--address",
        help=ADDRESS_HELP,
    )
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", help="run a trained checkpoint on files; see `montage predict <task> --help`")
    pr.add_argument("task")
    pr.add_argument("--checkpoint", required=True, help="checkpoint file or Ray checkpoint folder")
    pr.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    pr.set_defaults(func=cmd_predict, wants_extra=True)

    c = sub.add_parser("config", help="print the resolved config of a task")
    c.add_argument("task")
    c.add_argument("--config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=cmd_config)

    tu = sub.add_parser("tune", help="a Ray Tune + Optuna sweep from a tune config (tune_configs/*.yaml)")
    tu.add_argument("config")
    tu.add_argument(
        "overrides",
        nargs="*",
        help="overrides of the tune config (num_samples=2) or, as base.<key>=v, of the training config",
    )
    tu.add_argument("--resume", action="store_true", help="continue the interrupted sweep name=<sweep> in storage")
    tu.add_argument("--promote", choices=["better", "always", "never"], help="move @champion to the best trial's model")
    tu.add_argument(
        "--address",
        help=ADDRESS_HELP,
    )
    tu.set_defaults(func=cmd_tune)

    sb = sub.add_parser("submit", help="run `montage tune|train ...` as a Ray job on a cluster and stream its logs")
    sb.add_argument("command", choices=["tune", "train", "data"])
    sb.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="the head's dashboard, http://HEAD:8265",
    )
    sb.add_argument(
        "--working-dir",
        default=".",
        help="uploaded as the job's working dir ('' for none: every node has montage installed)",
    )
    sb.add_argument("--tracking-uri", help="MLFLOW_TRACKING_URI for the job, e.g. http://HEAD:5000")
    sb.add_argument("--no-follow", action="store_true", help="return after submitting")
    sb.add_argument(
        "--python", default="python", help="the cluster's Python with montage installed (e.g. ~/venv/bin/python)"
    )
    sb.set_defaults(func=cmd_submit, wants_extra=True)

    ls = sub.add_parser("tasks", help="list the registered tasks")
    ls.set_defaults(func=cmd_tasks)

    d = sub.add_parser("demo", help="a short end-to-end run on synthetic data")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=cmd_demo)
