"""Deployment variants against the fp32 PyTorch model, measured in one run on this machine:
PyTorch eager, ONNX fp32 and ONNX INT8 (static QDQ, per-channel) in ONNX Runtime, the same two
files in OpenVINO (fp32: converted to IR, float32 precision hint; INT8: the QDQ model compiled
by OpenVINO), and the network with 50 % of its channels pruned (Torch-Pruning) in PyTorch.

    python bench/optimize_bench.py [--size 512] [--runs 10] [--sections speed,quality] [--docs]

Speed: segmentation (ResNet-34 UNet, the production config) and harmonization (the production
widths) at ``--size``² with random weights — p50/p95 latency at batch 1 and images/s at batch 8.
Quality: the tiny segmentation and harmonization recipes trained briefly on synthetic data (the
parent), then, on the same validation set: the parent as INT8, pruned 50 % + fine-tuned, and a
distilled student (the task's default smaller model), each made by the platform's own
``montage optimize`` functions.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def speed(task: str, size: int, runs: int, tmp: Path) -> list[tuple[str, ...]]:
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.platform.export import export_onnx, quantize_int8, run_session, session
    from montage.platform.pruning import prune_channels

    cfg = load_config(
        task,
        TASKS.get(task).spec,
        packaged_config(task),
        ["model.pretrained=false", f"data.size={size}"] if task == "segmentation" else [f"data.size={size}"],
    )
    inst = TASKS.get(task)(cfg)
    nets = {k: v.eval() for k, v in inst.build_nets(pretrained=False).items()}
    gen = torch.Generator().manual_seed(0)
    example = {
        "image": torch.rand(1, 3, size, size, generator=gen),
        "composite": torch.rand(1, 3, size, size, generator=gen),
    }
    example["mask"] = (torch.rand(1, 1, size, size, generator=gen) > 0.5).float()
    spec = inst.export_spec(nets, example)
    fp32 = export_onnx(spec, tmp / f"{task}.onnx", dynamic_batch=True)

    def sample(k: str, v: torch.Tensor) -> torch.Tensor:
        x = torch.rand(1, *v.shape[1:], generator=gen)
        return (x > 0.5).float() if k == "mask" else x

    calib = [{k: sample(k, v) for k, v in spec.inputs.items()} for _ in range(8)]
    int8 = quantize_int8(fp32.path, tmp / f"{task}-int8.onnx", calib)
    sessions = {"onnx fp32": session(fp32.path), "onnx int8": session(int8)}
    import openvino as ov

    from montage.platform.ov_runtime import compile_ir, run_compiled

    ir = tmp / f"{task}.xml"
    ov.save_model(ov.convert_model(str(fp32.path)), str(ir), compress_to_fp16=False)
    compiled = {"openvino fp32": compile_ir(ir), "openvino int8": compile_ir(int8)}
    sizes = {
        "openvino fp32": (ir.stat().st_size + ir.with_suffix(".bin").stat().st_size) / 2**20,
        "openvino int8": int8.stat().st_size / 2**20,
    }
    module = spec.module.eval()
    pruned_module = copy.deepcopy(module)
    pruned_report = prune_channels(pruned_module, tuple(spec.inputs.values()), 0.5)

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in spec.inputs.items()}

    rows = []
    base = None
    for name in ("torch eager", "onnx fp32", "onnx int8", "openvino fp32", "openvino int8", "torch pruned-0.5"):
        params = fp32.params
        if name.startswith("torch"):
            net = module if name == "torch eager" else pruned_module

            def run(n: int, net=net) -> None:
                with torch.no_grad():
                    net(*batch(n).values())

            mb = fp32.size_mb if name == "torch eager" else fp32.size_mb * pruned_report.params_after / fp32.params
            params = fp32.params if name == "torch eager" else pruned_report.params_after
        elif name.startswith("openvino"):
            model = compiled[name]

            def run(n: int, model=model) -> None:
                run_compiled(model, batch(n))

            mb = sizes[name]
        else:
            sess = sessions[name]

            def run(n: int, sess=sess) -> None:
                run_session(sess, batch(n))

            mb = (int8.stat().st_size if name == "onnx int8" else Path(fp32.path).stat().st_size) / 2**20
        one = timed(lambda: run(1), runs)
        eight = timed(lambda: run(8), max(2, runs // 3))
        p50, p95, ips = pct(one, 0.5), pct(one, 0.95), 8 / statistics.median(eight)
        base = base or (p50, ips)
        ratios = (f"{base[0] / p50:.2f}×", f"{ips / base[1]:.2f}×")
        rows.append(
            (
                task,
                name,
                f"{mb:.1f}",
                f"{params / 1e6:.2f}M",
                f"{p50 * 1000:.0f}",
                f"{p95 * 1000:.0f}",
                f"{ips:.2f}",
                *ratios,
            )
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


def tta_cost(size: int, runs: int) -> str:
    """Segmentation's ``?tta=true`` (flip averaging) against one pass, through the predictor
    Serve runs, on a ``size``² photo, the passes in turns."""
    import numpy as np

    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.platform.evaluate import latency_pair

    cfg = load_config(
        "segmentation",
        TASKS.get("segmentation").spec,
        packaged_config("segmentation"),
        ["model.pretrained=false", f"data.size={size}"],
    )
    inst = TASKS.get("segmentation")(cfg)
    predictor = inst.make_predictor(
        {k: v.eval() for k, v in inst.build_nets(pretrained=False).items()}, torch.device("cpu")
    )
    photo = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    one, two = latency_pair(lambda: predictor([photo], tta=False), lambda: predictor([photo], tta=True), runs=runs)
    return f"segmentation ?tta=true at {size}²: p50 {two:.0f} ms vs {one:.0f} ms without ({two / one:.2f}×)"


def quality(task: str, tmp: Path) -> list[tuple[str, ...]]:
    """The tiny recipe trained briefly (the parent), then its variants measured on the same
    validation set: INT8 ONNX, 50 % channel pruning + fine-tune, and a distilled student."""
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.launch.local import as_one_process, fit_local
    from montage.launch.optimize import distill_model, prune_model
    from montage.platform.evaluate import evaluate
    from montage.platform.inference import OnnxNet
    from montage.tracking.variants import quantize_model

    epochs = {"segmentation": 6, "harmonization": 4}[task]
    over = [
        "tracking.enabled=false",
        "train.progress=false",
        f"train.epochs={epochs}",
        f"run.storage={tmp / 'runs'}",
        f"run.name={task}-parent",
    ]
    cfg = as_one_process(load_config(task, TASKS.get(task).spec, packaged_config(f"{task}-tiny"), over))
    t0 = time.perf_counter()
    parent = fit_local(cfg).best_checkpoint
    parent_s = time.perf_counter() - t0
    metric = TASKS.get(task).monitor[0]
    parent_value = evaluate(parent)[metric]
    rows = []

    def row(variant: str, value: float, params: str, note: str) -> None:
        rel = f"{(value / parent_value - 1) * 100:+.1f} %" if parent_value else "—"
        rows.append(
            (
                task,
                metric,
                variant,
                f"{parent_value:.4g}",
                f"{value:.4g}",
                f"{value - parent_value:+.4g}",
                rel,
                params,
                note,
            )
        )
        print(" | ".join(rows[-1]), flush=True)

    int8 = quantize_model(task, parent, tmp / f"q-{task}-int8.onnx", samples=32, register=False)
    row("INT8 ONNX", evaluate(parent, OnnxNet(int8.report.path))[metric], "same", "32 calibration samples")
    run = ["scaling.workers=1", f"run.storage={tmp / 'runs'}"]
    half = max(1, epochs // 2)
    t0 = time.perf_counter()
    pruned = prune_model(task, parent, ratio=0.5, epochs=half, overrides=run, register=False, no_ray=True)
    row(
        "pruned-0.5 + fine-tune",
        pruned.measurement.value,
        f"{pruned.parent_params / pruned.params:.1f}× fewer",
        f"{half} epochs fine-tune, {time.perf_counter() - t0:.0f} s",
    )
    t0 = time.perf_counter()
    student = distill_model(task, parent, epochs=epochs, overrides=run, register=False, no_ray=True)
    row(
        "student (distilled)",
        student.measurement.value,
        f"{student.parent_params / student.params:.1f}× fewer",
        f"{' '.join(student.overrides)}; {epochs} epochs, {time.perf_counter() - t0:.0f} s (parent {parent_s:.0f} s)",
    )
    return rows


HEAD = "task | variant | MB | params | p50 ms (b=1) | p95 ms (b=1) | img/s (b=8) | p50 speed-up | throughput"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--sections", default="speed,quality", help="speed, quality or both")
    p.add_argument("--docs", action="store_true", help="also write each section's table into docs/optimisation.md")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from docs_table import Tee, publish

    tmp = Path(tempfile.mkdtemp(prefix="montage-optimize-bench-"))
    try:
        if "speed" in args.sections:
            with Tee() as out:
                print(f"{torch.get_num_threads()} torch threads; {args.size}² inputs, random weights")
                print(HEAD)
                for task in ("segmentation", "harmonization"):
                    speed(task, args.size, args.runs, tmp)
                print(tta_cost(args.size, args.runs), flush=True)
            if args.docs:
                publish("docs/optimisation.md", "optimize_bench_speed", out.text)
        if "quality" in args.sections:
            with Tee() as out:
                print("task | metric | variant | parent | variant | delta | relative | parameters | notes")
                for task in ("segmentation", "harmonization"):
                    quality(task, tmp)
            if args.docs:
                publish("docs/optimisation.md", "optimize_bench_quality", out.text)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
