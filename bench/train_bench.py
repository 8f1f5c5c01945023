"""Training throughput: montage's loop and Ray Train against a plain PyTorch loop, in one run.

    python bench/train_bench.py --quick        # CPU, tiny sizes, < 5 minutes
    python bench/train_bench.py                # + realistic sizes, knobs at the realistic size (GPU)

Every figure is measured in this run, and every ratio is against a baseline from the same run
(these machines are noisy). Sections:

throughput   per task and size, on the same model, initial weights, batches, batch size and steps:
             plain  a hand-written loop: DataLoader → forward → loss → backward → step (the
                    task's own loss code; none of montage's loop, hooks or Ray)
             loop   montage's generic loop (what ``montage train --no-ray`` runs)
             ray1   Ray Train TorchTrainer, 1 worker: for the first task ``montage train`` from
                    the shell (it starts Ray), then fits in the bench's running Ray
             ray2   2 workers (DDP; CPU: gloo; with --quick, for the first task only)
             plain and loop run in two processes each that take turns epoch by epoch
             (turns.py), so a slow phase of the machine falls on all of them. Steady state = the fastest epoch
             after the first (which pays warm-up); peak memory = resident set (RSS) of the
             process that trained, and CUDA max allocated.
start-up     seconds from launch to the first train step: ``montage train`` from the shell
             (with and without Ray), TorchTrainer fits in a running Ray, each Tune trial.
knobs        each ``train.*`` performance option on vs off, montage's loop, one task; the
             baseline (first and last) and every knob in their own process, epochs taking turns.
             Every process of a ring stays alive until the ring ends: at the realistic size on
             a CPU that is ~3 GiB each (9 processes on a GPU machine, 7 on a CPU one).
pipeline     decode (OpenCV) + albumentations + collate at 384 px from JPEG files, against
             the model's own train-step rate at 384 px: the pipeline must not be the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s by default, so each fit's tear-down waits up to
# that long; a faster poll shortens this bench (8+ fits) and changes no figure it reports
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from input_pipeline import pipeline  # noqa: E402
from turns import Baton, BatonHook, peak_mb, reset_peak, take_turns  # noqa: E402

from montage.core.config import load_config  # noqa: E402
from montage.core.paths import packaged_config  # noqa: E402
from montage.core.registry import TASKS  # noqa: E402
from montage.platform.build import build_modules, make_loader  # noqa: E402
from montage.platform.loop import Hook  # noqa: E402
from montage.platform.runner import WorkerEnv, build_loop, make_task, seed_everything  # noqa: E402

SIZES = {  # (tiny, realistic) overrides per task
    "segmentation": (
        ["data.size=64"],
        ["model.encoder=resnet34", "model.decoder_channels=[256,128,64,32,16]", "data.size=256"],
    ),
    "harmonization": (["data.size=64"], ["model.widths=[32,64,128,256,512]", "data.size=256"]),
    "pix2pix": (
        ["data.size=64"],
        ["model.ngf=64", "model.ndf=64", "model.num_downs=8", "model.d_layers=3", "data.size=256"],
    ),
}
KNOBS = [  # (label, overrides turning it on); the baseline has every one off
    ("amp bf16", ["train.amp=bf16"]),
    ("amp fp16", ["train.amp=fp16"]),
    ("channels_last", ["train.channels_last=true"]),
    ("cudnn.benchmark", ["train.cudnn_benchmark=true"]),
    ("torch.compile", ["train.compile=default"]),
    ("grad checkpointing", ["model.grad_checkpointing=true"]),
    ("cache_data", ["train.cache_data=true"]),
]
KNOB_BASELINE = [
    "train.amp=off",
    "train.channels_last=false",
    "train.cudnn_benchmark=false",
    "train.compile=off",
    "train.cache_data=false",
]
CUDA_ONLY = {"amp fp16", "cudnn.benchmark"}


def cuda() -> bool:
    return torch.cuda.is_available()


def overrides(task: str, storage: str, extra: list[str]) -> list[str]:
    gpu = ["scaling.gpus=true"] if cuda() else []
    return [
        "tracking.enabled=false",
        f"run.storage={storage}",
        "data.synthetic_train=1024",
        "data.synthetic_val=8",
        "train.max_val_steps=1",
        "train.sample_every=0",
        *gpu,
        *extra,
    ]


def config(task: str, storage: str, extra: list[str]):
    return load_config(task, TASKS.get(task).spec, packaged_config(f"{task}-smoke"), overrides(task, storage, extra))


# --------------------------------------------------------------------------- throughput


def steady(samples_per_epoch: int, epoch_s: list[float]) -> float:
    """Samples/s of the fastest epoch after the first (which pays warm-up)."""
    return samples_per_epoch / min(epoch_s[1:])


class _PlainStepper:
    """backward + step, nothing else: what a hand-written loop does."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def optimize(self, loss, name="main"):
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def plain(cfg, steps: int, epochs: int, baton: Baton | None = None) -> dict[str, float]:
    """A hand-written loop over the task's pieces: ``epochs`` of ``steps`` batches; the fastest
    epoch after the first counts."""
    reset_peak()
    seed_everything(cfg.train.seed)  # the same initial weights and batches as montage's loop
    task = make_task(cfg)
    dev = torch.device("cuda" if cuda() else "cpu")
    m = build_modules(task, dev)
    loader = make_loader(task.datasets()[0], cfg, train=True, device=dev)
    stepper = _PlainStepper(m.optimizers)
    for net in m.nets.values():
        net.train()
    times = []
    for epoch in range(epochs):
        if baton:
            baton.wait()
        loader.generator.manual_seed(cfg.train.seed + epoch)  # the same batches, in the same order, as montage's loop
        t0 = time.perf_counter()
        for i, batch in enumerate(loader):
            if i == steps:
                break
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            task.train_step(m, batch, stepper)
        if cuda():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if baton:
            baton.pass_on()
    rss, gpu = peak_mb()
    return {"sps": steady(steps * cfg.train.batch_size, times), "rss": rss, "gpu": gpu, "epoch_s": times}


class _EpochTimes(Hook):
    def __init__(self) -> None:
        self.train_s: list[float] = []

    def after_epoch(self, loop, metrics) -> None:
        self.train_s.append(metrics["time/train_s"])


def montage_loop(cfg, steps: int, epochs: int, baton: Baton | None = None) -> dict[str, float]:
    """montage's loop in this process (what ``montage train --no-ray`` runs)."""
    reset_peak()
    cfg.train.max_steps, cfg.train.epochs = steps, epochs
    times = _EpochTimes()
    hooks: list[Hook] = [times] + ([BatonHook(baton)] if baton else [])
    build_loop(cfg, WorkerEnv(device=torch.device("cuda" if cuda() else "cpu")), hooks=hooks).fit()
    rss, gpu = peak_mb()
    return {
        "sps": steady(steps * cfg.train.batch_size, times.train_s),
        "rss": rss,
        "gpu": gpu,
        "epoch_s": times.train_s,
    }


def ray_overrides(steps: int, epochs: int, workers: int) -> list[str]:
    """A TorchTrainer run of ``epochs`` × ``steps`` whose every epoch comes back with its checkpoint;
    on CPU the workers share all the machine's cores (Ray sets each worker's threads to its CPUs)."""
    cpus = [] if cuda() else [f"scaling.cpus_per_worker={(os.cpu_count() or 2) / workers}"]
    return [
        f"train.max_steps={steps}",
        f"train.epochs={epochs}",
        f"scaling.keep_checkpoints={epochs}",
        f"scaling.workers={workers}",
        *cpus,
    ]


def from_checkpoints(
    metrics: dict[str, Any], checkpoints: list[dict[str, Any]], samples_per_epoch: int
) -> dict[str, float]:
    """Steady state of a Ray run from its kept checkpoints' metrics (rank 0's ``time/train_s``)."""
    train_s = [c["metrics"]["time/train_s"] for c in sorted(checkpoints, key=lambda c: c["metrics"]["epoch"])]
    return {
        "sps": steady(samples_per_epoch, train_s),
        "rss": metrics["mem/peak_rss_mb"],
        "gpu": metrics.get("mem/cuda_peak_mb", 0.0),
        "startup": metrics["time/startup_s"],
    }


def ray_fit(task: str, storage: str, extra: list[str], steps: int, workers: int, epochs: int) -> dict[str, float]:
    """A TorchTrainer fit in the bench's running Ray."""
    from montage.launch.train import fit_ray

    cfg = config(
        task,
        storage,
        [*extra, *ray_overrides(steps, epochs, workers), f"run.name=bench-{task}-{workers}-{time.time_ns()}"],
    )
    out = fit_ray(cfg, launched_at=time.time())
    if out.error:
        raise RuntimeError(out.error)
    # each worker ran ``steps`` batches, so the global rate scales with workers
    return from_checkpoints(
        out.metrics,
        [{"path": c.path, "metrics": c.metrics} for c in out.checkpoints],
        workers * steps * cfg.train.batch_size,
    )


def cli_run(task: str, storage: str, extra: list[str], no_ray: bool = False) -> dict[str, Any]:
    """``montage train`` in a fresh process, as a user types it; returns the summary it prints."""
    cmd = [
        sys.executable,
        "-m",
        "montage.cli",
        "train",
        task,
        "--config",
        f"{task}-smoke",
        *overrides(task, storage, extra),
        f"run.name=cli-{time.time_ns()}",
    ]
    if no_ray:
        cmd.append("--no-ray")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if out.returncode:
        raise RuntimeError(f"montage train failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout[out.stdout.index("{\n") :])


def cli_fit(task: str, storage: str, extra: list[str], steps: int, epochs: int) -> dict[str, float]:
    """ray1 exactly as a user runs it: ``montage train`` from the shell, which starts Ray and
    fits a 1-worker TorchTrainer; per-epoch figures come from the kept checkpoints it prints."""
    summary = cli_run(task, storage, [*extra, *ray_overrides(steps, epochs, 1)])
    return from_checkpoints(
        summary["metrics"], summary["checkpoints"], steps * config(task, storage, extra).train.batch_size
    )


# ------------------------------------------------------------------------------ start-up


def cli_startup(storage: str, no_ray: bool) -> float:
    """``montage train`` in a fresh process: seconds from its start to the first train step."""
    summary = cli_run("segmentation", storage, ["train.max_steps=2"], no_ray=no_ray)
    return summary["metrics"]["time/startup_s"]


def tune_startup(storage: str, trials: int) -> list[float]:
    """Seconds from each Tune trial's start to its TorchTrainer's first train step."""
    from montage.launch.tune import load_tune_config, run_sweep

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{storage}/mlflow.db"
    tcfg, base, params = load_tune_config(
        ROOT / "tune_configs" / "segmentation-tiny.yaml",
        [
            f"num_samples={trials}",
            "max_concurrent=1",
            f"storage={storage}/tune",
            f"name=bench-{time.time_ns()}",
            "base.train.epochs=1",
            "base.train.max_steps=2",
            "base.train.max_val_steps=1",
            "base.train.sample_every=0",
            "base.data.size=32",
            "base.train.progress=false",
            "base.tracking.log_model=false",
            "scheduler.grace_period=1",
        ],
    )
    result = run_sweep(tcfg, base, params)
    if result.errors:
        raise RuntimeError(result.errors)
    return [t.metrics["time/startup_s"] for t in result.table]


# ---------------------------------------------- pipeline (the model side; the input side is input_pipeline.py)


def model_rate(extra: list[str], steps: int, size: int = 384, batch_size: int = 4) -> float:
    """The segmentation model's train-step rate (images/s) at ``size`` on in-memory tensors."""
    cfg = config("segmentation", tempfile.mkdtemp(), [*extra, f"data.size={size}"])
    task = make_task(cfg)
    dev = torch.device("cuda" if cuda() else "cpu")
    m = build_modules(task, dev)
    n = batch_size
    batch = {
        "image": torch.rand(n, 3, size, size, device=dev),
        "mask": (torch.rand(n, 1, size, size, device=dev) > 0.5).float(),
        "valid": torch.ones(n, 1, size, size, device=dev),
    }
    stepper = _PlainStepper(m.optimizers)
    for i in range(steps + 1):
        if i == 1:
            if cuda():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        task.train_step(m, batch, stepper)
    if cuda():
        torch.cuda.synchronize()
    return steps * n / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- main


def mean_of(*results: dict[str, Any]) -> dict[str, float]:
    """One configuration measured in several processes: mean rate, largest peak memory."""
    return {
        "sps": sum(r["sps"] for r in results) / len(results),
        "rss": max(r["rss"] for r in results),
        "gpu": max(r["gpu"] for r in results),
    }


def checked(results: list[Any]) -> list[Any]:
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.0f}" if isinstance(v, float) else str(v)

    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes only, 2-worker DDP on the first task only (CPU, < 5 minutes)"
    )
    p.add_argument("--steps", type=int, default=0, help="train steps per epoch (default 6 quick, 30 full)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per measurement: the fastest after the first counts")
    p.add_argument("--tasks", default="segmentation,harmonization,pix2pix")
    p.add_argument("--sections", default="throughput,startup,knobs,pipeline")
    p.add_argument("--docs", action="store_true", help="also write the report into its block of docs/performance.md")
    args = p.parse_args()
    steps, epochs = args.steps or (6 if args.quick else 30), max(2, args.epochs)
    trials = 2 if args.quick else 4
    sections = set(args.sections.split(","))
    import ray

    t_start = time.perf_counter()
    t_mark = [t_start]

    def mark(name: str) -> None:
        now = time.perf_counter()
        if now - t_mark[0] > 1:
            print(f"[{name}: {now - t_mark[0]:.0f} s]", flush=True)
        t_mark[0] = now

    def need_ray() -> None:  # the bench's own Ray session, started when first needed
        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), logging_level="ERROR", log_to_driver=False)

    storage = tempfile.mkdtemp(prefix="montage-bench-runs-")
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if cuda() else 'no GPU'}; "
        f"{steps} steps/epoch, {epochs} epochs",
        flush=True,
    )
    out: list[str] = []
    sizes = [("tiny", 0)] + ([] if args.quick else [("real", 1)])
    cli_with_ray: float | None = None  # start-up of `montage train` (with Ray), from the first ray1 run
    in_session: list[str] = []  # start-up of TorchTrainer fits in the bench's running Ray

    if "throughput" in sections:
        rows = []
        tasks = args.tasks.split(",")
        for task in tasks:
            for label, k in sizes:
                extra = SIZES[task][k]
                # two processes each, in the order plain, loop, loop, plain: one process's speed
                # varies by up to ±15 % on this kind of VM for the same code, and a ring position
                # may matter; the mean of two, placed symmetrically, halves both
                p1, l1, l2, p2 = checked(
                    take_turns(
                        [
                            (fn, (config(task, storage, extra), steps, epochs))
                            for fn in (plain, montage_loop, montage_loop, plain)
                        ]
                    )
                )
                r = {"plain": mean_of(p1, p2), "loop": mean_of(l1, l2)}
                print(
                    f"{task}/{label}: per process plain {p1['sps']:.1f}, {p2['sps']:.1f}  loop {l1['sps']:.1f}, "
                    f"{l2['sps']:.1f} samples/s",
                    flush=True,
                )
                if cli_with_ray is None:  # the first ray1 is `montage train` from the shell, Ray started by it
                    r["ray1"] = cli_fit(task, storage, extra, steps, epochs)
                    cli_with_ray = r["ray1"]["startup"]
                else:
                    need_ray()
                    r["ray1"] = ray_fit(task, storage, extra, steps, 1, epochs)
                    in_session.append(f"{task}/{label} 1 worker {r['ray1']['startup']:.1f}")
                if not args.quick or task == tasks[0]:  # --quick: DDP scaling on the first task only
                    need_ray()
                    r["ray2"] = ray_fit(task, storage, extra, steps, 2, epochs)
                    in_session.append(f"{task}/{label} 2 workers {r['ray2']['startup']:.1f}")
                sps = {k2: v["sps"] for k2, v in r.items()}
                print(
                    f"{task}/{label}: " + "  ".join(f"{k2} {v:.1f}" for k2, v in sps.items()) + " samples/s", flush=True
                )
                mem = "/".join(f"{r[k2]['rss']:.0f}" for k2 in r) + (
                    " (GPU " + "/".join(f"{r[k2]['gpu']:.0f}" for k2 in r) + ")" if cuda() else ""
                )
                ray2, scaling = (sps["ray2"], sps["ray2"] / sps["ray1"]) if "ray2" in r else ("-", "-")
                rows.append(
                    [
                        f"{task}/{label}",
                        sps["plain"],
                        sps["loop"],
                        sps["ray1"],
                        ray2,
                        sps["loop"] / sps["plain"],
                        sps["ray1"] / sps["plain"],
                        scaling,
                        mem,
                    ]
                )
        out.append(
            "Throughput (samples/s, steady state: the fastest epoch after the first) and peak memory (MiB RSS: "
            "plain/loop/ray1[/ray2])\n"
        )
        out.append(
            table(
                [
                    "task/size",
                    "plain/s",
                    "loop/s",
                    "ray1/s",
                    "ray2/s",
                    "loop÷plain",
                    "ray1÷plain",
                    "ray2÷ray1",
                    "peak MiB",
                ],
                rows,
            )
        )
    mark("throughput")
    if "startup" in sections:
        local = cli_startup(storage, no_ray=True)
        if cli_with_ray is None:
            cli_with_ray = cli_startup(storage, no_ray=False)
        need_ray()
        per_trial = tune_startup(storage, trials)
        out.append(
            f"\nStart-up to the first train step: `montage train --no-ray` {local:.1f} s, `montage train` (starts "
            f"Ray) {cli_with_ray:.1f} s; "
            + (f"TorchTrainer fits in a running Ray: {', '.join(in_session)} s; " if in_session else "")
            + "Tune trials (one Ray session, one trial at a time): "
            + ", ".join(f"{t:.1f}" for t in per_trial)
            + " s"
        )
    if ray.is_initialized():
        ray.shutdown()
    mark("start-up")
    if "knobs" in sections:
        label, k = sizes[-1]
        extra = SIZES["segmentation"][k]
        knob_epochs, knob_steps = (5, 5) if args.quick else (epochs, steps)

        runnable = [(name, over) for name, over in KNOBS if cuda() or name not in CUDA_ONLY]
        results = take_turns(
            [  # the baseline and every knob, each in its own process, epochs taking turns
                (montage_loop, (config("segmentation", storage, extra + KNOB_BASELINE + over), knob_steps, knob_epochs))
                for over in [[]] + [o for _, o in runnable] + [[]]
            ]
        )
        base = mean_of(*checked([results[0], results[-1]]))  # the baseline first and last in the ring
        done = dict(zip((n for n, _ in runnable), results[1:-1]))
        rows = []
        for name, _ in KNOBS:
            r = done.get(name)
            if r is None:
                rows.append([name, "n/a (CUDA only)", "", "", ""])
            elif isinstance(r, Exception):  # a knob this machine cannot run is reported, not fatal
                rows.append([name, f"failed: {str(r)[:100]}", "", "", ""])
            else:
                mem = r["gpu"] / max(base["gpu"], 1e-9) if cuda() else r["rss"] / base["rss"]
                rows.append([name, r["sps"], r["sps"] / base["sps"], r["gpu"] if cuda() else r["rss"], mem])
        out.append(
            f"\nKnobs, segmentation/{label}, montage's loop, epochs taking turns with the baseline (all off: "
            f"{base['sps']:.1f} samples/s, "
            f"peak {base['gpu'] if cuda() else base['rss']:.0f} MiB)\n"
        )
        out.append(table(["knob", "samples/s", "÷ baseline", "peak MiB", "memory ÷ baseline"], rows))
    mark("knobs")
    if "pipeline" in sections:
        label, k = sizes[-1]
        rate = model_rate(SIZES["segmentation"][k][:-1], 2)
        rows = []
        for workers, cache in ((0, False), (2, False), (2, True)):
            ips = pipeline(48, workers, cache)
            rows.append([f"{workers} loader workers" + (", cache_data" if cache else ""), ips, ips / rate])
        out.append(
            f"\nInput pipeline at 384 px (JPEG decode + albumentations + collate) against segmentation/{label}'s "
            f"train step at 384 px ({rate:.1f} img/s)\n"
        )
        out.append(table(["pipeline", "img/s", "÷ model img/s"], rows))
    mark("pipeline")
    print("\n" + "\n".join(out))
    print(f"\nbench wall time {time.perf_counter() - t_start:.0f} s")
    if args.docs:
        from docs_table import publish

        publish("docs/performance.md", "train_bench_quick" if args.quick else "train_bench", "\n".join(out), True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
