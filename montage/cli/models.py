"""Commands on registered models: models (list, promote), export, optimize (and ``openvino``'s variant)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from montage.cli.common import TRACKING_HELP
from montage.core import schema

log = logging.getLogger("montage")


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
        variant = f"{t.get(schema.VARIANT, 'fp32'):<13} {t.get(schema.RUNTIME, 'torch'):<11}"
        measured = (
            f" params={t[schema.PARAMS]} p50={t[schema.LATENCY_MS]}ms Δ{t[schema.QUALITY_DELTA]}"
            if schema.LATENCY_MS in t
            else ""
        )
        judged = f"{t.get(schema.METRIC, '?')}={t.get(schema.VALUE, '?'):<12}"
        print(
            f"{v.name} v{v.version:<4} {variant} {judged} sweep={t.get(schema.SWEEP, '-')}{measured} "
            f"run={v.run_id} {mark}"
        )
    return 0


def _source(args: argparse.Namespace) -> Any:
    """``--source`` parsed (default: the task's champion)."""
    from montage.core.sources import ModelSource

    return ModelSource.parse(args.source, "--source") if args.source else ModelSource.champion(args.task)


def cmd_export(args: argparse.Namespace) -> int:
    from montage.tracking.variants import export_model, report_dict

    source = _source(args)
    if args.format == "openvino":  # the same as `montage optimize <task> --method openvino`
        return _openvino(args, source, "fp32")
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


def _openvino(args: argparse.Namespace, source: Any, precision: str) -> int:
    from montage.tracking.ov_variant import openvino_model, variant_name
    from montage.tracking.variants import report_dict

    variant = openvino_model(
        args.task,
        source,
        args.output or f"{args.task}-{variant_name(precision)}.xml",
        precision=precision,
        samples=getattr(args, "samples", 8),
        tolerance=getattr(args, "tolerance", None),
        tracking_uri=args.tracking_uri or "",
        register=args.register,
    )
    print(json.dumps(report_dict(variant), indent=2))
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    source = _source(args)
    uri = args.tracking_uri or ""
    if args.method == "openvino":
        return _openvino(args, source, args.precision or "fp32")
    if args.method == "quantize":
        from montage.tracking.variants import quantize_model, report_dict

        precision = args.precision or "int8"
        output = args.output or f"{args.task}-{precision}.onnx"
        variant = quantize_model(
            args.task,
            source,
            output,
            samples=args.samples,
            tracking_uri=uri,
            register=args.register,
            precision=precision,
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


def register(sub: Any) -> None:
    mo = sub.add_parser("models", help="the MLflow registry: list versions, move @champion")
    mo.add_argument("action", choices=["list", "promote"])
    mo.add_argument("task")
    mo.add_argument("version", nargs="?")
    mo.add_argument("--tracking-uri", help=TRACKING_HELP)
    mo.set_defaults(func=cmd_models)

    ex = sub.add_parser(
        "export", help="export a model to ONNX, checked against PyTorch with ONNX Runtime, registered as a variant"
    )
    ex.add_argument("task")
    ex.add_argument(
        "--source",
        help="models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint (local or s3://…)",
    )
    ex.add_argument(
        "--format",
        choices=["onnx", "openvino"],
        default="onnx",
        help="onnx (default), or openvino: the same as `montage optimize <task> --method openvino` (fp32 IR)",
    )
    ex.add_argument("--opset", type=int, default=18)
    ex.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="a dynamic batch dimension (spatial size is always dynamic, in multiples of the network's stride)",
    )
    ex.add_argument("--output", help="the .onnx file (default <task>.onnx; openvino: the .xml, <task>-openvino.xml)")
    ex.add_argument(
        "--register",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register as a new version (default: when the source is a registered model)",
    )
    ex.add_argument("--tracking-uri", help=TRACKING_HELP)
    ex.set_defaults(func=cmd_export)

    op = sub.add_parser(
        "optimize",
        help="an optimised variant of a model (INT8, OpenVINO, pruned, distilled student), measured against it and "
        "registered",
    )
    op.add_argument("task")
    op.add_argument(
        "--source",
        help="models:/montage-<task>@champion (default), models:/<name>/<version>, or a checkpoint (local or s3://…)",
    )
    op.add_argument(
        "--method",
        choices=["quantize", "openvino", "prune", "distill"],
        default="quantize",
        help="quantize: INT8 static quantization (ONNX Runtime); openvino: the ONNX export as OpenVINO IR; "
        "prune: channel pruning (Torch-Pruning) + fine-tune; distill: train a smaller student",
    )
    op.add_argument(
        "overrides",
        nargs="*",
        help="prune/distill: overrides of the training run, e.g. scaling.workers=2 train.batch_size=8",
    )
    op.add_argument(
        "--samples",
        type=int,
        default=32,
        help="quantize, openvino: validation samples to calibrate on (int8) and to check against PyTorch on",
    )
    op.add_argument(
        "--precision",
        choices=["int8", "fp16", "fp32"],
        help="quantize: int8 (default; static, ONNX Runtime CPU) or fp16 (GPU providers); openvino: fp32 (default) "
        "or int8 (the quantize method's QDQ model, run by OpenVINO in INT8)",
    )
    op.add_argument(
        "--tolerance",
        type=float,
        help="openvino: the largest |OpenVINO − PyTorch| accepted (default 1e-3 for fp32; for int8 2× ONNX "
        "Runtime's own error on the same model, 8× on a CPU without VNNI, +1e-3)",
    )
    op.add_argument(
        "--output",
        help="quantize: the .onnx file (default <task>-<precision>.onnx); openvino: the .xml, its weights beside it "
        "as .bin (default <task>-openvino[-int8].xml)",
    )
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
    op.add_argument("--tracking-uri", help=TRACKING_HELP)
    op.set_defaults(func=cmd_optimize)
