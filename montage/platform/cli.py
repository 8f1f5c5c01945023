"""``montage`` command line: train | predict | demo | tasks | config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("montage")

NOISY_LOGGERS = ("ray", "mlflow", "alembic", "urllib3", "filelock", "ray.train", "ray.tune", "ray.serve", "optuna")


def setup_logging(level: int = logging.INFO, quiet_ray: bool = True) -> None:
    """montage's own loggers at ``level``; everything else (Ray, MLflow, ...) at warnings.

    Adds a handler only where none exists (a Ray worker already has Ray's)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    logging.getLogger("montage").setLevel(level)
    root.setLevel(logging.WARNING if quiet_ray else level)
    if quiet_ray:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def resolve_config_path(config: str | None) -> Path | None:
    """A YAML path, or the name of a config shipped in ``montage/configs`` (e.g. segmentation-tiny)."""
    if config is None:
        return None
    path = Path(config)
    if path.is_file():
        return path
    packaged = Path(__file__).resolve().parent.parent / "configs" / f"{config.removesuffix('.yaml')}.yaml"
    return packaged if packaged.is_file() else path


def _load(task: str, config: str | None, overrides: Sequence[str]) -> Any:
    from montage.platform.config import load_config
    from montage.platform.registry import TASKS

    task_cls = TASKS.get(task)
    return load_config(task, task_cls.spec, resolve_config_path(config), list(overrides))


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"scaling.workers={args.workers}")
    if args.gpus:
        overrides.append("scaling.gpus=true")
    cfg = _load(args.task, args.config, overrides)
    if args.no_ray:
        from montage.platform.runner import fit_local

        summary = fit_local(cfg, resume=args.resume)
    else:
        from montage.platform.train import fit_ray

        summary = fit_ray(cfg, resume=args.resume, address=args.address)
    print(json.dumps(_summary(summary), indent=2, default=str))
    return 1 if summary.get("error") else 0


def _summary(s: dict[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in (s.get("metrics") or {}).items() if k.startswith(("val/", "best/", "train/total", "epoch"))}
    return {**s, "metrics": metrics}


def cmd_predict(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from montage.platform.inference import load_for_inference
    from montage.platform.registry import TASKS

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
    from montage.platform.registry import TASKS

    for name in TASKS.names():
        cls = TASKS.get(name)
        print(f"{name:14s} monitor={cls.monitor[0]} ({cls.monitor[1]})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved config (defaults + file + overrides) as YAML."""
    import yaml

    from montage.platform.config import to_dict

    cfg = _load(args.task, args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    from montage.platform.registry import DATA_COMMANDS

    return DATA_COMMANDS.get(args.name)(extra)


def cmd_demo(args: argparse.Namespace) -> int:
    from montage.demo import run_demo

    return run_demo(Path(args.out), workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="montage", description="Distributed training, tuning and serving of photo-compositing models on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, Ray and MLflow included")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a task (Ray Train TorchTrainer, or in-process with --no-ray)")
    t.add_argument("task")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 loss.dice=0.5")
    t.add_argument("--workers", type=int, help="number of DDP workers (scaling.workers)")
    t.add_argument("--gpus", action="store_true", help="one GPU per worker (scaling.gpus=true)")
    t.add_argument("--resume", help="a run folder <storage>/<name> to continue from its latest checkpoint")
    t.add_argument("--no-ray", action="store_true", help="run the loop in this process (debugging)")
    t.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")
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

    dt = sub.add_parser("data", help="prepare a dataset, e.g. `montage data catflw --src DIR --out DIR`")
    dt.add_argument("name", help="the data command (catflw, ...)")
    dt.set_defaults(func=cmd_data, wants_extra=True)

    ls = sub.add_parser("tasks", help="list the registered tasks")
    ls.set_defaults(func=cmd_tasks)

    d = sub.add_parser("demo", help="a short end-to-end run on synthetic data")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from montage.platform.checkpoint import CheckpointError
    from montage.platform.config import ConfigError
    from montage.platform.imaging import ImageError
    from montage.platform.registry import UnknownNameError

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # key=value pairs given after options
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra and not getattr(args, "wants_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, quiet_ray=not args.verbose)
    try:
        return args.func(args, extra) if getattr(args, "wants_extra", False) else args.func(args)
    except (ConfigError, UnknownNameError, CheckpointError, ImageError, FileNotFoundError, FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
