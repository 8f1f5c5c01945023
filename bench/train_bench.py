"""Training throughput: montage's loop and Ray Train against a plain PyTorch loop, in one run.

    python bench/train_bench.py --quick        # CPU, tiny sizes, < 5 minutes
    python bench/train_bench.py                # + realistic sizes (GPU recommended)

For each task it measures, on the same model, data, batch size and steps:
  plain   a hand-written loop: DataLoader → forward → loss → backward → step (the task's own
          loss code, none of montage's loop, hooks or Ray)
  loop    montage's generic loop in this process (``--no-ray``)
  ray1    Ray Train TorchTrainer, 1 worker
  ray2    Ray Train TorchTrainer, 2 workers (DDP; CPU: gloo)
and the input pipeline alone (decode JPEG + albumentations + collate at 384 px). Steady-state
samples/s come from the last epoch (the first pays warm-up); start-up is the wall time not
spent in epochs. Ratios are against ``plain`` measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

from conftest import TINY  # noqa: E402  the tiny per-task settings the tests use

from montage.platform.config import load_config  # noqa: E402
from montage.platform.loop import build_modules, make_loader  # noqa: E402
from montage.platform.registry import TASKS  # noqa: E402
from montage.platform.runner import WorkerEnv, build_loop, make_task  # noqa: E402

SIZES = {  # (quick, realistic) overrides per task
    "segmentation": (["data.size=64"], ["model.encoder=resnet34", "model.decoder_channels=[256,128,64,32,16]", "data.size=256"]),
    "harmonization": (["data.size=64"], ["model.widths=[32,64,128,256,512]", "data.size=256"]),
    "pix2pix": (["data.size=64"], ["model.ngf=64", "model.ndf=64", "model.num_downs=8", "model.d_layers=3", "data.size=256"]),
}


def config(task: str, storage: str, extra: list[str]):
    return load_config(task, TASKS.get(task).spec, None, TINY[task] + [
        "tracking.enabled=false", f"run.storage={storage}", "data.synthetic_train=512", "data.synthetic_val=8",
        "train.max_val_steps=1", "train.sample_every=0", *extra,
    ])


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


def plain(cfg, steps: int) -> float:
    """samples/s of a plain loop over the same task pieces (last ``steps`` after 2 warm-up)."""
    task = make_task(cfg)
    dev = torch.device("cuda" if cfg.scaling.gpus and torch.cuda.is_available() else "cpu")
    m = build_modules(task, dev)
    loader = make_loader(task.datasets()[0], cfg, train=True, device=dev)
    stepper = _PlainStepper(m.optimizers)
    it = iter(loader)
    for net in m.nets.values():
        net.train()
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        batch = {k: v.to(dev) for k, v in next(it).items()}
        task.train_step(m, batch, stepper)
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def montage_loop(cfg, steps: int) -> tuple[float, float]:
    cfg.train.max_steps, cfg.train.epochs = steps, 2
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), hooks=[])
    t0 = time.perf_counter()
    m = loop.fit()
    wall = time.perf_counter() - t0
    return steps * cfg.train.batch_size / m["time/epoch_s"], wall


def ray_fit(cfg, steps: int, workers: int) -> tuple[float, float]:
    from montage.platform.train import fit_ray

    cfg.train.max_steps, cfg.train.epochs = steps, 2
    cfg.scaling.workers = workers
    # all the machine's CPUs shared by the workers: Ray sets each worker's OMP threads to its CPUs
    cfg.scaling.cpus_per_worker = (os.cpu_count() or 2) / workers
    cfg.run.name = f"bench-{cfg.task}-{workers}-{time.time_ns()}"
    t0 = time.perf_counter()
    out = fit_ray(cfg)
    wall = time.perf_counter() - t0
    if out["error"]:
        raise RuntimeError(out["error"])
    epoch_s = out["metrics"]["time/epoch_s"]
    # each worker ran ``steps`` batches: the global throughput scales with the workers
    return workers * steps * cfg.train.batch_size / epoch_s, wall - 2 * epoch_s


def pipeline(n: int, workers: int, size: int = 384) -> float:
    """images/s of decode (OpenCV) + albumentations + collate at ``size`` from JPEG files."""
    import cv2

    from montage.tasks.segmentation.data import SegDataConfig, SegmentationDataset
    from montage.tasks.segmentation.sources import ImageMaskFolder, SyntheticPersons

    tmp = Path(tempfile.mkdtemp(prefix="montage-bench-"))
    (tmp / "img").mkdir()
    (tmp / "mask").mkdir()
    src = SyntheticPersons(32, size=512, seed=0)
    for i in range(32):
        img, alpha, _ = src.load(i)
        cv2.imwrite(str(tmp / "img" / f"{i:03d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tmp / "mask" / f"{i:03d}.png"), alpha)
    ds = SegmentationDataset(ImageMaskFolder(str(tmp / "img"), str(tmp / "mask")), size, SegDataConfig().augment)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    seen, t0 = 0, None
    while seen < n:
        for batch in loader:
            if t0 is None:
                t0 = time.perf_counter()  # after the first batch: workers are up
                continue
            seen += batch["image"].shape[0]
            if seen >= n:
                break
    return seen / (time.perf_counter() - t0)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes only (CPU, < 5 minutes)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--tasks", default="segmentation,harmonization,pix2pix")
    args = p.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="montage-bench-runs-")
    rows = []
    for task in args.tasks.split(","):
        for label, extra in (("tiny", SIZES[task][0]), ("real", SIZES[task][1])):
            if label == "real" and args.quick:
                continue
            base = plain(config(task, storage, extra), args.steps)
            loop_sps, loop_wall = montage_loop(config(task, storage, extra), args.steps)
            r1, start1 = ray_fit(config(task, storage, extra), args.steps, 1)
            r2, start2 = ray_fit(config(task, storage, extra), args.steps, 2)
            rows.append((f"{task}/{label}", base, loop_sps, r1, r2, start1, start2))
            print(f"{task}/{label}: plain {base:.1f}  loop {loop_sps:.1f}  ray1 {r1:.1f}  ray2 {r2:.1f} samples/s", flush=True)
    pipe = {w: pipeline(64, w) for w in (0, 2)}
    print()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print(f"{'task/size':22s} {'plain/s':>8s} {'loop/s':>8s} {'ray1/s':>8s} {'ray2/s':>8s} {'loop÷plain':>10s} {'ray1÷plain':>10s} {'ray2÷ray1':>9s} {'start1 s':>8s} {'start2 s':>8s}")
    for name, base, lp, r1, r2, s1, s2 in rows:
        print(f"{name:22s} {base:8.1f} {lp:8.1f} {r1:8.1f} {r2:8.1f} {lp / base:10.2f} {r1 / base:10.2f} {r2 / r1:9.2f} {s1:8.1f} {s2:8.1f}")
    print(f"input pipeline at 384 px (decode + albumentations + collate): {pipe[0]:.0f} img/s with 0 loader workers, {pipe[2]:.0f} img/s with 2")
    print(f"peak RSS of this process: {rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
