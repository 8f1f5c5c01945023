"""``/v1/composite`` latency and throughput over HTTP vs the same pipeline in-process.

    python bench/serve_bench.py [--requests 32] [--size 512] [--models tiny|default] [--fused] [--int8] [--rollout]
                                [k=v ...]

Trains tiny segmentation and harmonization checkpoints (seconds), starts the Serve
application on a local Ray, then for 1, 4 and 16 concurrent clients sends 512×512 person +
background PNGs and reports p50/p95 latency and requests/s, next to the same work
(decode → segment → paste → harmonize → encode) called in this process: the ratio is
Serve's overhead. After the one-client level, where that time went, from the application's
own ``GET /v1/monitor`` (the ingress's stages and each model's time per batch): the client's
p50 minus the ingress's is the HTTP proxy and the transfer; a model stage minus that model's
batch time is its handle hop (queueing, ``@serve.batch`` wait, the array's transfer both ways).
``--fused`` also measures the same application with ``fused: true`` (the models in the ingress
replica, no hops); ``--models default`` uses the production networks (ResNet-34 UNet at 384,
harmonization widths 32–512 at 256, random weights) instead of tiny ones; ``k=v`` overrides the
serve config (e.g. ``segmentation.batch_wait_timeout_s=0.002``). ``--rollout`` also measures a
challenger beside both models (a second deployment of each, same weights: the cost of the
rollout machinery, not of a different network): a 10 % canary and a shadow (docs/rollout.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def smoke(task: str, overrides: list[str]):
    """The packaged smallest config of ``task`` (what the tests train)."""
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS

    return load_config(task, TASKS.get(task).spec, packaged_config(f"{task}-smoke"), overrides)


def int8_sources(ckpts: dict[str, str], tmp: Path) -> list[str]:
    """Register both checkpoints in a registry of the bench's own, quantize each to INT8 (a
    registered variant) and return the serve overrides that run those variants in ONNX Runtime."""
    from montage.core.sources import ModelSource
    from montage.tracking import registry as reg
    from montage.tracking.runs import create_run, prepare_tracking
    from montage.tracking.variants import quantize_model

    uri = f"sqlite:///{tmp / 'registry.db'}"
    out = [f"tracking_uri={uri}"]
    for task, ckpt in ckpts.items():
        cfg = smoke(task, [f"tracking.uri={uri}", f"tracking.artifacts={tmp / 'artifacts'}"])
        prepare_tracking(cfg)
        metric, mode = ("val/iou", "max") if task == "segmentation" else ("val/fmse", "min")
        version = reg.register_checkpoint(cfg, ckpt, create_run(cfg), metric, mode, 0.0, "bench", {}, "always").version
        parent = ModelSource.registered(reg.model_name(task), version=version)
        variant = quantize_model(task, parent, tmp / f"{task}-int8.onnx", samples=8, tracking_uri=uri)
        out += [f"{task}.source={parent.at_version(variant.version)}", f"{task}.runtime=onnx"]
    return out


def untrained(task: str, tmp: Path) -> str:
    """A checkpoint of the production network of ``task`` with random weights, on synthetic data."""
    from montage.core.config import load_config, to_dict
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.platform.checkpoint import save_checkpoint

    over = ["data.source=synthetic", "model.pretrained=false"] if task == "segmentation" else ["data.source=synthetic"]
    cfg = load_config(task, TASKS.get(task).spec, packaged_config(task), over)
    nets = TASKS.get(task)(cfg).build_nets(pretrained=False)
    return str(
        save_checkpoint(
            {"task": task, "config": to_dict(cfg), "nets": {k: v.state_dict() for k, v in nets.items()}},
            tmp / f"{task}-default.pt",
        )
    )


def breakdown(url: str, client_p50: float) -> str:
    """Where a one-client ``/v1/composite`` spent its time, from ``GET /v1/monitor`` (p50s, ms)."""
    import requests

    doc = requests.get(f"{url}/v1/monitor", timeout=30).json()
    ep = doc["endpoints"]["/v1/composite"]
    st = {k: v["p50"] for k, v in ep["stages"].items()}
    model = {t: doc["models"].get(t, {}).get("batch_ms", {}).get("p50", 0.0) for t in ("segmentation", "harmonization")}
    ingress = ep["latency_ms"]["p50"]
    parts = [
        f"proxy+HTTP {client_p50 * 1000 - ingress:.0f}",
        f"decode {st.get('decode', 0):.0f}",
        f"segment {st.get('segment', 0):.0f} (model {model['segmentation']:.0f}, hop "
        f"{st.get('segment', 0) - model['segmentation']:.0f})",
        f"paste {st.get('paste', 0):.0f}",
        f"harmonize {st.get('harmonize', 0):.0f} (model {model['harmonization']:.0f}, hop "
        f"{st.get('harmonize', 0) - model['harmonization']:.0f})",
        f"encode {st.get('encode', 0):.0f}",
    ]
    return (
        f"  one client, p50 ms: client {client_p50 * 1000:.0f} = "
        + " + ".join(parts)
        + f" + rest {ingress - sum(st.values()):.0f}"
    )


def settled(url: str, timeout: float = 900) -> None:
    """Wait until no model, champion or challenger, is still computing its drift reference (a replica
    serving a checkpoint without a stored one computes it in the background at start: minutes of
    CPU for the production networks, which would be measured as Serve's cost)."""
    import requests

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        doc = requests.get(f"{url}/v1/monitor", timeout=30).json()
        states = {t: m.get("reference") for t, m in doc["models"].items()}
        states.update({f"{t} challenger": r["reference"]["challenger"] for t, r in doc.get("rollout", {}).items()})
        if "pending" not in states.values():
            return
        time.sleep(2)
    raise TimeoutError(f"drift references still pending after {timeout} s: {states}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--size", type=int, default=512)
    p.add_argument(
        "--int8", action="store_true", help="also serve INT8 variants of both models (runtime: onnx) and measure them"
    )
    p.add_argument(
        "--fused", action="store_true", help="also serve with fused: true (the models inside the ingress replica)"
    )
    p.add_argument(
        "--rollout", action="store_true", help="also serve a 10 %% canary and a shadow challenger of both models"
    )
    p.add_argument(
        "--models",
        choices=["tiny", "default"],
        default="tiny",
        help="tiny networks (the platform's cost) or the production ones",
    )
    p.add_argument("--docs", action="store_true", help="also write what it prints into its block of the docs (BLOCKS)")
    p.add_argument("overrides", nargs="*", help="serve config overrides, e.g. segmentation.batch_wait_timeout_s=0.002")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from docs_table import Tee, publish

    with Tee() as out:
        code = measure(args)
    if args.docs:
        publish(*BLOCKS[args.models, args.rollout], out.text)
    return code


# where --docs writes: (models, --rollout) → (docs file, block)
BLOCKS = {
    ("tiny", False): ("docs/performance.md", "serve_bench"),
    ("default", False): ("docs/performance.md", "serve_bench_production"),
    ("tiny", True): ("docs/rollout.md", "serve_bench_rollout"),
    ("default", True): ("docs/rollout.md", "serve_bench_rollout_production"),
}


def measure(args: argparse.Namespace) -> int:
    import ray
    import requests

    from montage.launch.local import fit_local
    from montage.platform.imaging import decode_image, encode_png
    from montage.platform.inference import load_predictor
    from montage.platform.masks import SyntheticPersons, textured_background
    from montage.serve.app import load_serve_config, run
    from montage.serve.imaging import Placement, paste

    tmp = Path(tempfile.mkdtemp(prefix="montage-serve-bench-"))
    over = ["tracking.enabled=false", "train.max_steps=1", "data.size=64"]
    if args.models == "tiny":
        ckpts = {
            t: fit_local(smoke(t, [*over, f"run.name={t}", f"run.storage={tmp / 'runs'}"])).best_checkpoint
            for t in ("segmentation", "harmonization")
        }
    else:
        ckpts = {t: untrained(t, tmp) for t in ("segmentation", "harmonization")}
    s = args.size
    person = encode_png(SyntheticPersons(1, size=s, seed=3).load(0)[0])
    background = encode_png(textured_background(np.random.default_rng(1), s, s))

    seg, harm = (
        load_predictor(ckpts["segmentation"], device="cpu"),
        load_predictor(ckpts["harmonization"], device="cpu"),
    )

    def in_process() -> bytes:
        pi, bg = decode_image(person), decode_image(background)
        raw, mask = paste(pi, seg([pi])[0], bg, Placement())
        return encode_png(harm([raw], [mask])[0])

    in_process()
    local = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        in_process()
        local.append(time.perf_counter() - t0)

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = [f"port={port}", f"monitoring.window={args.requests}", *args.overrides]
    torch_sources = [f"segmentation.source={ckpts['segmentation']}", f"harmonization.source={ckpts['harmonization']}"]
    run(load_serve_config(None, [*base, *torch_sources]))
    url = f"http://127.0.0.1:{port}/v1/composite"

    def call(_: int) -> float:
        t0 = time.perf_counter()
        r = requests.post(url, files={"person": person, "background": background}, timeout=300)
        r.raise_for_status()
        return time.perf_counter() - t0

    what = (
        "tiny models (the figures are the platform's cost, not model compute)"
        if args.models == "tiny"
        else "the production networks (random weights)"
    )
    print(
        f"machine: {os.cpu_count()} CPUs; {s}×{s} person + background; {what}; serve overrides: "
        f"{args.overrides or 'none'}"
    )
    print(
        f"in-process pipeline: p50 {statistics.median(local) * 1000:.0f} ms, p95 {pct(local, 0.95) * 1000:.0f} ms, "
        f"{1 / statistics.mean(local):.1f} req/s"
    )
    runtimes = {"torch fp32": [*base, *torch_sources]}
    if args.fused:
        runtimes["torch fp32, fused"] = [*base, *torch_sources, "fused=true"]
    if args.int8:
        runtimes["onnxruntime int8"] = [*base, *int8_sources(ckpts, tmp)]
    if args.rollout:
        challengers = [f"{t}.challenger={shutil.copy(c, tmp / f'{t}-challenger.pt')}" for t, c in ckpts.items()]
        runtimes["canary 10 % (challenger of both models)"] = [*base, *torch_sources, *challengers]
        runtimes["shadow (challenger of both models)"] = [
            *base,
            *torch_sources,
            *challengers,
            "segmentation.rollout.mode=shadow",
            "harmonization.rollout.mode=shadow",
        ]
    first, baseline_rate = next(iter(runtimes)), {}
    for name, overrides in runtimes.items():
        run(load_serve_config(None, overrides))  # in place: replicas reconfigure to the new sources
        call(0)
        settled(url.rsplit("/v1/", 1)[0])
        print(
            f"\n{name}\n{'clients':>7s} {'p50 ms':>7s} {'p95 ms':>7s} {'req/s':>6s} {'p50 ÷ in-process':>17s}"
            f" {'req/s ÷ ' + first:>24s}"
        )
        for clients in (1, 4, 16):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = list(pool.map(call, range(args.requests)))
            wall = time.perf_counter() - t0
            p50 = statistics.median(lat)
            rate = args.requests / wall
            baseline_rate.setdefault(clients, rate)  # the first application measured (one model per task)
            print(
                f"{clients:7d} {p50 * 1000:7.0f} {pct(lat, 0.95) * 1000:7.0f} {rate:6.1f} "
                f"{p50 / statistics.median(local):17.2f} {rate / baseline_rate[clients]:24.2f}",
                flush=True,
            )
            if clients == 1:
                print(breakdown(url.rsplit("/v1/", 1)[0], p50), flush=True)
    from ray import serve

    serve.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
