"""The experimenter's toolbox: ``check`` (sanity checks), ``lr-find`` (learning-rate range test),
``cv`` (K-fold cross-validation), every task through the platform's one loop; and ``openvino``
(``montage optimize <task> --method openvino`` under its own name)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from montage.cli.common import ADDRESS_HELP, LAUNCHED_AT, TRACKING_HELP, load_config_for
from montage.core import schema

log = logging.getLogger("montage")


def _device(args: argparse.Namespace) -> str | None:
    return args.device


def _one_process_config(args: argparse.Namespace) -> Any:
    """The config in this process at the global batch of its configured workers (the checks and
    the sweep run one process; the recipe's learning rate belongs to its global batch)."""
    from montage.launch.local import as_one_process

    return as_one_process(load_config_for(args.task, args.config, args.overrides))


def _track(cfg: Any, kind: str, metrics: dict[str, float], files: list[str], tags: dict[str, str]) -> str | None:
    """A finished MLflow run of ``kind`` (check, lr-find) in the task's experiment, or None when tracking is off."""
    if not cfg.tracking.enabled:
        return None
    import mlflow
    from mlflow.entities import Metric

    from montage.tracking.runs import create_run, prepare_tracking, resolve_tracking_uri

    prepare_tracking(cfg)
    if not cfg.run.name:
        cfg.run.name = f"{cfg.task}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = create_run(cfg, {schema.ROLE: kind, **tags})
    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri))
    now = int(time.time() * 1000)
    entries = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(entries), 500):
        client.log_batch(run_id, metrics=entries[i : i + 500])
    for f in files:
        client.log_artifact(run_id, f)
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ------------------------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    from montage.platform.sanity import run_checks

    cfg = _one_process_config(args)
    out = Path(args.out or f"checks/{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    results = run_checks(cfg, out, device=_device(args), steps=args.steps, fraction=args.fraction)
    for r in results:
        print(r.line())
    metrics = {f"check/{r.name.replace(' ', '_').replace('+', 'and')}": float(r.passed) for r in results}
    summary = {r.name: {"passed": r.passed, "message": r.message, "figure": r.figure} for r in results}
    (out / "checks.json").write_text(json.dumps(summary, indent=2))
    files = [str(out / "checks.json"), *[r.figure for r in results if r.figure]]
    run_id = _track(cfg, "check", metrics, files, {schema.CHECK_PASSED: str(all(r.passed for r in results))})
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed; figures in {out}" + _run(run_id))
    return 1 if failed else 0


def _run(run_id: str | None) -> str:
    return f" (MLflow run {run_id})" if run_id else ""


# ------------------------------------------------------------------------------ lr-find


def cmd_lr_find(args: argparse.Namespace) -> int:
    from montage.platform.lrfind import lr_find

    cfg = _one_process_config(args)
    out = Path(args.out or f"checks/{args.task}-lr-find-{time.strftime('%Y%m%d-%H%M%S')}")
    results = lr_find(
        cfg,
        out,
        args.optimizer or None,
        _device(args),
        lo=args.lo,
        hi=args.hi,
        steps=args.steps,
        diverge=args.diverge,
        rule=args.rule,
    )
    for r in results:
        print(r.line())
    metrics: dict[str, float] = {}
    for r in results:
        metrics[f"lr_find/{r.optimizer}/suggested_lr"] = r.suggested
        metrics[f"lr_find/{r.optimizer}/steepest_lr"] = r.steepest
        metrics[f"lr_find/{r.optimizer}/valley_lr"] = r.valley
        metrics[f"lr_find/{r.optimizer}/min_loss_lr"] = r.min_lr
    (out / "lr_find.json").write_text(json.dumps([vars(r) for r in results], indent=2, default=str))
    run_id = _track(cfg, "lr-find", metrics, [str(out / "lr_find.json"), results[0].figure], {})
    if run_id:
        _log_curves(cfg, run_id, results)
    print(f"plot: {results[0].figure}" + _run(run_id))
    if args.write:
        _write_lrs(args.config, {r.config_key: r.suggested for r in results})
    return 0


def _log_curves(cfg: Any, run_id: str, results: list[Any]) -> None:
    """The sweeps as MLflow series (step = sweep step): the loss and the learning rate."""
    import mlflow
    from mlflow.entities import Metric

    from montage.tracking.runs import resolve_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(cfg.tracking.uri))
    now = int(time.time() * 1000)
    for r in results:
        entries = [Metric(f"lr_find/{r.optimizer}/lr", lr, now, i) for i, lr in enumerate(r.lrs)]
        entries += [Metric(f"lr_find/{r.optimizer}/loss", v, now, i) for i, v in enumerate(r.smoothed)]
        for i in range(0, len(entries), 500):
            client.log_batch(run_id, metrics=entries[i : i + 500])


def _write_lrs(config: str | None, values: dict[str, float]) -> None:
    """Set ``values`` (dotted keys such as optim.lr) in the YAML file ``config``, keeping its other keys."""
    import yaml

    from montage.core.config import read_tree

    if not config or not Path(config).is_file():
        raise ValueError("--write needs --config FILE: the YAML file the suggested learning rate is written into")
    tree = read_tree(config)
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = float(f"{value:.3g}")
    Path(config).write_text(yaml.safe_dump(tree, sort_keys=False))
    print(f"wrote {', '.join(f'{k}={v:.3g}' for k, v in values.items())} into {config}")


# ----------------------------------------------------------------------------------- cv


def cmd_cv(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.folds:
        overrides.append(f"cv.folds={args.folds}")
    cfg = load_config_for(args.task, args.config, overrides)
    return run_cv_command(cfg, args.no_ray, args.address)


def run_cv_command(cfg: Any, no_ray: bool, address: str | None) -> int:
    """What ``montage cv`` and ``montage train`` with ``cv.folds`` ≥ 2 run."""
    from montage.launch.cv import run_cv

    result = run_cv(cfg, use_ray=not no_ray, address=address, launched_at=LAUNCHED_AT)
    print(result.table())
    if result.error:
        log.error("%s", result.error)
    return 1 if result.error else 0


# ----------------------------------------------------------------------------- openvino


def cmd_openvino(args: argparse.Namespace) -> int:
    """``montage optimize <task> --method openvino`` under its own name."""
    from montage.cli.models import cmd_optimize

    args.method = "openvino"
    return cmd_optimize(args)


# ------------------------------------------------------------------------------ parsers


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("task")
    p.add_argument("--config", help="YAML config file (or a shipped config name)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.batch_size=4")


def register(sub: Any) -> None:
    c = sub.add_parser(
        "check", help="sanity checks before a long run: overfit one batch, gradient flow, one train+val step"
    )
    _common(c)
    c.add_argument("--out", help="folder for the figures (default checks/<task>-<time>)")
    c.add_argument("--steps", type=int, default=100, help="overfit: steps on the one batch (default 100)")
    c.add_argument("--fraction", type=float, default=0.5, help="overfit: the loss must fall below this x its start")
    c.add_argument("--device", help="cpu | cuda (default: cuda with scaling.gpus=true)")
    c.set_defaults(func=cmd_check)

    lf = sub.add_parser("lr-find", help="learning-rate range test: loss vs an exponentially growing LR, a suggestion")
    _common(lf)
    lf.add_argument("--out", help="folder for the plot (default checks/<task>-lr-find-<time>)")
    lf.add_argument("--optimizer", action="append", help="sweep this optimizer only (repeatable; default: each)")
    lf.add_argument("--steps", type=int, default=200, help="steps of the sweep (default 200)")
    lf.add_argument("--lo", type=float, default=1e-6, help="first learning rate (default 1e-6)")
    lf.add_argument("--hi", type=float, default=1.0, help="last learning rate (default 1)")
    lf.add_argument("--diverge", type=float, default=4.0, help="stop once the smoothed loss is this x its lowest")
    lf.add_argument(
        "--rule", choices=["valley", "steepest"], default="valley", help="which suggestion (default valley)"
    )
    lf.add_argument("--write", action="store_true", help="write the suggestion(s) as optim.lr (…) into --config")
    lf.add_argument("--device", help="cpu | cuda")
    lf.set_defaults(func=cmd_lr_find)

    cv = sub.add_parser("cv", help="K-fold cross-validation: K fits, one MLflow parent run with mean ± std")
    _common(cv)
    cv.add_argument("--folds", type=int, help="K (cv.folds); default from the config")
    cv.add_argument("--no-ray", action="store_true", help="the folds one after the other in this process")
    cv.add_argument("--address", help=ADDRESS_HELP)
    cv.set_defaults(func=cmd_cv)

    ov = sub.add_parser(
        "openvino",
        help="the same as `montage optimize <task> --method openvino`: OpenVINO IR, checked, measured, registered",
    )
    ov.add_argument("task")
    ov.add_argument(
        "--source",
        help="models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint (local or s3://…)",
    )
    ov.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="fp32 (default) or int8 (QDQ)")
    ov.add_argument("--samples", type=int, default=32, help="validation samples to check on (and calibrate int8 on)")
    ov.add_argument("--tolerance", type=float, help="max |OpenVINO − PyTorch| (default 1e-3; int8: see optimize)")
    ov.add_argument(
        "--output", help="the .xml file (default <task>-openvino[-int8].xml; the weights beside it as .bin)"
    )
    ov.add_argument(
        "--register",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register as a new version (default: when the source is a registered model)",
    )
    ov.add_argument("--tracking-uri", help=TRACKING_HELP)
    ov.set_defaults(func=cmd_openvino)
