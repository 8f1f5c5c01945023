"""``montage`` command line: train | predict | demo | tasks | config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

LAUNCHED_AT = time.time()  # before the heavy imports: `montage train` reports start-up from here
log = logging.getLogger("montage")

from montage.core.logs import setup_logging  # noqa: E402  (light: no torch, Ray or MLflow)
from montage.core.paths import resolve_config_path  # noqa: E402


def _load(task: str, config: str | None, overrides: Sequence[str]) -> Any:
    from montage.core.config import load_config
    from montage.core.registry import TASKS

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

    cfg = _load(args.task, args.config, args.overrides)
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
        [t.name, t.status.value, str(t.epochs), *[_fmt(t.params[k]) for k in keys], _fmt(t.best(metric))]
        for t in result.table
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = [
        f"sweep {result.name} (MLflow parent run {result.parent_run_id})",
        "  ".join(h.ljust(w) for h, w in zip(head, widths)),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if result.best:
        lines.append(f"best: {result.best.name} {metric}={_fmt(result.best.best(metric))}")
    if result.registered:
        r = result.registered
        lines.append(
            f"registered {r.name} version {r.version}" + (" → @champion" if r.promoted else " (champion kept)")
        )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_models(args: argparse.Namespace) -> int:
    from montage.tracking import registry as st

    if args.action == "promote":
        if not args.version:
            raise ValueError("montage models promote <task> <version>")
        st.promote(args.task, args.version, args.tracking_uri or "")
        print(f"{st.model_name(args.task)}@{st.CHAMPION} → version {args.version}")
        return 0
    champ = st.champion(args.task, args.tracking_uri or "")
    for v in st.list_versions(args.task, args.tracking_uri or ""):
        mark = f"@{st.CHAMPION}" if champ is not None and str(champ.version) == str(v.version) else ""
        t = v.tags
        variant = f"{t.get('montage.variant', 'fp32'):<11} {t.get('montage.runtime', 'torch'):<11}"
        measured = (
            f" params={t['montage.params']} p50={t['montage.latency_ms']}ms Δ{t['montage.quality_delta']}"
            if "montage.latency_ms" in t
            else ""
        )
        judged = f"{t.get('montage.metric', '?')}={t.get('montage.value', '?'):<12}"
        print(
            f"{v.name} v{v.version:<4} {variant} {judged} sweep={t.get('montage.sweep', '-')}{measured} "
            f"run={v.run_id} {mark}"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from montage.serve.app import load_serve_config, run

    if args.overrides[:1] == ["keygen"]:  # `montage serve keygen`: a new API key and its hash line
        from montage.serve.access import new_key

        if args.overrides[1:]:
            raise ValueError("montage serve keygen takes no arguments")
        key, line = new_key()
        print(f"API key (give it to the client; it is shown only now and never stored):\n  {key}")
        print(
            f"Add this line to the file named by auth.api_keys_file (e.g. serve_keys.txt, kept out of git):\n  {line}"
        )
        print(f"Clients send:  Authorization: Bearer {key}")
        return 0
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    cfg = load_serve_config(resolve_config_path(args.config), args.overrides)
    if args.reload:
        run(cfg, blocking=False, insecure=args.insecure)
        print(f"application '{cfg.name}' updated: replicas now serve the configured sources")
        return 0
    from montage.serve.access import check_bind, resolve_settings

    access = resolve_settings(cfg.auth, cfg.cors)
    check_bind(cfg.host, access, args.insecure)  # refuse before saying "serving"
    print(f"serving on http://{cfg.host}:{cfg.port}/ (API keys {'on' if access.auth else 'off'}; Ctrl-C to stop)")
    run(cfg, blocking=True, insecure=args.insecure)
    return 0


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


def cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    from montage.core.registry import DATA_COMMANDS

    return DATA_COMMANDS.get(args.name)(extra)


def cmd_export(args: argparse.Namespace) -> int:
    from montage.tracking.registry import CHAMPION, model_name
    from montage.tracking.variants import export_model, report_dict

    source = args.source or f"models:/{model_name(args.task)}@{CHAMPION}"
    output = args.output or f"{args.task}.onnx"
    variant = export_model(
        args.task,
        source,
        output,
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
        tracking_uri=args.tracking_uri or "",
        register=args.register,
    )
    print(json.dumps(report_dict(variant), indent=2))
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from montage.tracking.registry import CHAMPION, model_name

    source = args.source or f"models:/{model_name(args.task)}@{CHAMPION}"
    uri = args.tracking_uri or ""
    if args.method == "quantize":
        from montage.tracking.variants import quantize_model, report_dict

        output = args.output or f"{args.task}-{args.precision}.onnx"
        variant = quantize_model(
            args.task,
            source,
            output,
            samples=args.samples,
            tracking_uri=uri,
            register=args.register,
            precision=args.precision,
        )
        print(json.dumps(report_dict(variant), indent=2))
        return 0
    from montage.launch.optimize import distill_model, prune_model

    common = {
        "overrides": args.overrides,
        "tracking_uri": uri,
        "register": args.register,
        "no_ray": args.no_ray,
        "address": args.address,
    }
    if args.method == "prune":
        made = prune_model(
            args.task,
            source,
            ratio=args.ratio,
            mode=args.prune_mode,
            epochs=2 if args.epochs is None else args.epochs,
            **common,
        )
    else:
        made = distill_model(
            args.task,
            source,
            student=args.student,
            weight=args.weight,
            temperature=args.temperature,
            epochs=args.epochs,
            **common,
        )
    print(json.dumps(made.as_dict(), indent=2, default=str))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from montage.serve.report import monitor

    return monitor(
        args.url, watch=args.watch, png=args.png, api_key=args.api_key or os.environ.get("MONTAGE_API_KEY", "")
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from montage.demo import run_demo

    return run_demo(Path(args.out), workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="montage", description="Distributed training, tuning and serving of photo-compositing models on Ray."
    )
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
    t.add_argument(
        "--address",
        help="Ray address: auto joins a `ray start` cluster on this machine "
        "(default $RAY_ADDRESS, else a private local Ray)",
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
        help="Ray address: auto joins a `ray start` cluster on this machine "
        "(default $RAY_ADDRESS, else a private local Ray)",
    )
    tu.set_defaults(func=cmd_tune)

    mo = sub.add_parser("models", help="the MLflow registry: list versions, move @champion")
    mo.add_argument("action", choices=["list", "promote"])
    mo.add_argument("task")
    mo.add_argument("version", nargs="?")
    mo.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")
    mo.set_defaults(func=cmd_models)

    ex = sub.add_parser(
        "export", help="export a model to ONNX, checked against PyTorch with ONNX Runtime, registered as a variant"
    )
    ex.add_argument("task")
    ex.add_argument(
        "--source", help="models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint file"
    )
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--opset", type=int, default=18)
    ex.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="a dynamic batch dimension (spatial size is always dynamic, in multiples of the network's stride)",
    )
    ex.add_argument("--output", help="the .onnx file (default <task>.onnx)")
    ex.add_argument(
        "--register",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register as a new version (default: when the source is a registered model)",
    )
    ex.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")
    ex.set_defaults(func=cmd_export)

    op = sub.add_parser(
        "optimize",
        help="an optimised variant of a model (INT8, pruned, distilled student), measured against it and registered",
    )
    op.add_argument("task")
    op.add_argument(
        "--source", help="models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint file"
    )
    op.add_argument(
        "--method",
        choices=["quantize", "prune", "distill"],
        default="quantize",
        help="quantize: INT8 static quantization (ONNX Runtime); prune: channel pruning (Torch-Pruning) + fine-tune; "
        "distill: train a smaller student",
    )
    op.add_argument(
        "overrides",
        nargs="*",
        help="prune/distill: overrides of the training run, e.g. scaling.workers=2 train.batch_size=8",
    )
    op.add_argument("--samples", type=int, default=32, help="quantize: validation samples to calibrate on")
    op.add_argument(
        "--precision",
        choices=["int8", "fp16"],
        default="int8",
        help="quantize: int8 (static, ONNX Runtime CPU) or fp16 (GPU providers)",
    )
    op.add_argument("--output", help="quantize: the .onnx file (default <task>-<precision>.onnx)")
    op.add_argument(
        "--ratio", type=float, default=0.5, help="prune: fraction of channels (or of weights, magnitude mode) removed"
    )
    op.add_argument(
        "--prune-mode",
        choices=["channels", "magnitude"],
        default="channels",
        help="prune: structured channels (default) or unstructured L1 magnitude",
    )
    op.add_argument(
        "--epochs",
        type=int,
        help="prune: fine-tune epochs (default 2; 0 = none); distill: training epochs (default: the teacher's config)",
    )
    op.add_argument(
        "--student",
        nargs="*",
        default=[],
        help="distill: the student's config overrides (default: the task's smaller model, e.g. model.encoder=tiny)",
    )
    op.add_argument("--weight", type=float, default=1.0, help="distill: distill.weight")
    op.add_argument("--temperature", type=float, default=2.0, help="distill: distill.temperature")
    op.add_argument(
        "--no-ray", action="store_true", help="prune/distill: train in this process instead of a Ray Train run"
    )
    op.add_argument("--address", help="prune/distill: Ray address (default $RAY_ADDRESS, else a private local Ray)")
    op.add_argument(
        "--register",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register as a new version (default: when the source is a registered model)",
    )
    op.add_argument("--tracking-uri", help="default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db")
    op.set_defaults(func=cmd_optimize)

    sv = sub.add_parser("serve", help="the Ray Serve application (segment, harmonize, composite, pix2pix)")
    sv.add_argument("--config", help="serve YAML (e.g. serve.yaml)")
    sv.add_argument(
        "overrides",
        nargs="*",
        help="e.g. segmentation.source=runs/x/best.pt port=8080; or `keygen`: print a new API key and its hash line",
    )
    sv.add_argument(
        "--reload",
        action="store_true",
        help="update a running application (e.g. after `montage models promote`) and exit",
    )
    sv.add_argument("--address", help="Ray cluster address, e.g. auto for a `ray start` cluster")
    sv.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback host without API keys (anyone who reaches the port can call /v1/*)",
    )
    sv.set_defaults(func=cmd_serve)

    sb = sub.add_parser("submit", help="run `montage tune|train ...` as a Ray job on a cluster and stream its logs")
    sb.add_argument("command", choices=["tune", "train", "data"])
    sb.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
        help="the head's dashboard, http://HEAD:8265",
    )
    sb.add_argument("--working-dir", default=".", help="uploaded as the job's working dir")
    sb.add_argument("--tracking-uri", help="MLFLOW_TRACKING_URI for the job, e.g. http://HEAD:5000")
    sb.add_argument("--no-follow", action="store_true", help="return after submitting")
    sb.add_argument(
        "--python", default="python", help="the cluster's Python with montage installed (e.g. ~/venv/bin/python)"
    )
    sb.set_defaults(func=cmd_submit, wants_extra=True)

    dt = sub.add_parser("data", help="prepare a dataset, e.g. `montage data catflw --src DIR --out DIR`")
    dt.add_argument("name", help="the data command (catflw, ...)")
    dt.set_defaults(func=cmd_data, wants_extra=True)

    ls = sub.add_parser("tasks", help="list the registered tasks")
    ls.set_defaults(func=cmd_tasks)

    mn = sub.add_parser(
        "monitor", help="latency per stage, errors, drift and anomalies of a running application (GET /v1/monitor)"
    )
    mn.add_argument("--url", default="http://127.0.0.1:8000", help="the application's HTTP address")
    mn.add_argument("--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    mn.add_argument("--png", help="write a PNG of p95 latency and drift (PSI) over time")
    mn.add_argument("--api-key", help="bearer key when the server has auth on (default $MONTAGE_API_KEY)")
    mn.set_defaults(func=cmd_monitor)

    d = sub.add_parser("demo", help="a short end-to-end run on synthetic data")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from montage.core.config import ConfigError
    from montage.core.registry import UnknownNameError
    from montage.platform.checkpoint import CheckpointError
    from montage.platform.export import ExportError
    from montage.platform.imaging import ImageError

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
    except (
        ConfigError,
        UnknownNameError,
        CheckpointError,
        ImageError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        ExportError,
    ) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
