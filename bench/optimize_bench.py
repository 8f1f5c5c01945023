"""Deployment variants against the fp32 PyTorch model, measured in one run on this machine:
PyTorch eager, ONNX fp32 and ONNX INT8 (static QDQ, per-channel) in ONNX Runtime.

    python bench/optimize_bench.py [--size 512] [--runs 10]

Speed: segmentation (ResNet-34 UNet, the production config) and harmonization (the production
widths) at ``--size``² with random weights — p50/p95 latency at batch 1 and images/s at batch 8.
Quality: the tiny segmentation and harmonization recipes trained briefly on synthetic data,
their validation metric in PyTorch against the same network as INT8.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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

    cfg = load_config(task, TASKS.get(task).spec, packaged_config(task), ["model.pretrained=false", f"data.size={size}"] if task == "segmentation" else [f"data.size={size}"])
    inst = TASKS.get(task)(cfg)
    nets = {k: v.eval() for k, v in inst.build_nets(pretrained=False).items()}
    gen = torch.Generator().manual_seed(0)
    example = {"image": torch.rand(1, 3, size, size, generator=gen), "composite": torch.rand(1, 3, size, size, generator=gen)}
    example["mask"] = (torch.rand(1, 1, size, size, generator=gen) > 0.5).float()
    spec = inst.export_spec(nets, example)
    fp32 = export_onnx(spec, tmp / f"{task}.onnx", dynamic_batch=True)
    def sample(k: str, v: torch.Tensor) -> torch.Tensor:
        x = torch.rand(1, *v.shape[1:], generator=gen)
        return (x > 0.5).float() if k == "mask" else x

    calib = [{k: sample(k, v) for k, v in spec.inputs.items()} for _ in range(8)]
    int8 = quantize_int8(fp32.path, tmp / f"{task}-int8.onnx", calib)
    sessions = {"onnx fp32": session(fp32.path), "onnx int8": session(int8)}
    module = spec.module.eval()

    def batch(n: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in spec.inputs.items()}

    rows = []
    base = None
    for name in ("torch eager", "onnx fp32", "onnx int8"):
        if name == "torch eager":
            def run(n: int) -> None:
                with torch.no_grad():
                    module(*batch(n).values())
            mb = fp32.size_mb
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
        rows.append((task, name, f"{mb:.1f}", f"{fp32.params / 1e6:.2f}M", f"{p50 * 1000:.0f}", f"{p95 * 1000:.0f}", f"{ips:.2f}", *ratios))
        print(" | ".join(rows[-1]), flush=True)
    return rows


def quality(task: str, tmp: Path) -> tuple[str, ...]:
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.launch.local import as_one_process
    from montage.platform.export import export_onnx, quantize_int8
    from montage.platform.inference import OnnxNet
    from montage.platform.runner import WorkerEnv, build_loop
    from montage.tracking.variants import validation_batch

    epochs = {"segmentation": 6, "harmonization": 4}[task]
    over = ["tracking.enabled=false", "train.progress=false", f"train.epochs={epochs}"]
    cfg = as_one_process(load_config(task, TASKS.get(task).spec, packaged_config(f"{task}-tiny"), over))
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])
    loop.fit()
    metric = loop.best.metric
    fp32_value = loop.evaluate()[metric]
    spec = loop.task.export_spec(loop.m.nets, validation_batch(loop.task, 2))
    fp32 = export_onnx(spec, tmp / f"q-{task}.onnx", dynamic_batch=True)
    calib = [loop.task.export_spec(loop.m.nets, b).inputs for b, _ in zip(torch.utils.data.DataLoader(loop.task.datasets()[1], batch_size=1), range(32))]
    int8 = quantize_int8(fp32.path, tmp / f"q-{task}-int8.onnx", calib)
    net = OnnxNet(int8)
    if task == "harmonization":  # the loop evaluates the composited output: the network's forward
        from montage.tasks.harmonization.model import apply_transform

        inner = net

        class Composited(torch.nn.Module):
            def forward(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return apply_transform(composite, mask, inner(composite, mask))

            def transform(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return inner(composite, mask)

        net = Composited()
    loop.m.nets[loop.task.export_net] = net
    int8_value = loop.evaluate()[metric]
    delta = int8_value - fp32_value
    return (task, metric, f"{fp32_value:.4g}", f"{int8_value:.4g}", f"{delta:+.4g}", f"{(int8_value / fp32_value - 1) * 100:+.1f} %")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="montage-optimize-bench-"))
    try:
        print(f"{torch.get_num_threads()} torch threads; onnxruntime CPU EP; {args.size}² inputs, random weights")
        print("task | variant | MB | params | p50 ms (b=1) | p95 ms (b=1) | img/s (b=8) | p50 speed-up | throughput")
        for task in ("segmentation", "harmonization"):
            speed(task, args.size, args.runs, tmp)
        print("\ntask | metric | fp32 PyTorch | INT8 ONNX | delta | relative")
        for task in ("segmentation", "harmonization"):
            print(" | ".join(quality(task, tmp)), flush=True)
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
