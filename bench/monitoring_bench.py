"""Cost of monitoring (metrics, windows, drift features) on ``/v1/composite``: the same
application with ``monitoring.enabled`` on and off, alternated in the same run.

    python bench/monitoring_bench.py [--requests 40] [--rounds 2] [--size 512]

One client (latency, not throughput, is what monitoring could cost). Also times the
per-request monitoring work alone, in process (feature extraction on the person and the
composite, the alpha statistics).
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import pct, smoke  # noqa: E402

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=40, help="requests per round")
    p.add_argument("--rounds", type=int, default=2, help="on/off pairs")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--docs", action="store_true", help="also write the figures into docs/monitoring.md")
    args = p.parse_args()
    import ray
    import requests

    from montage.launch.local import fit_local
    from montage.platform.features import alpha_features, colour_change, input_features
    from montage.platform.imaging import encode_png
    from montage.platform.masks import SyntheticPersons, textured_background
    from montage.serve.app import load_serve_config, run

    tmp = Path(tempfile.mkdtemp(prefix="montage-monitoring-bench-"))
    over = ["tracking.enabled=false", "train.max_steps=1", "data.size=64"]
    ckpts = {
        t: fit_local(smoke(t, [*over, f"run.name={t}", f"run.storage={tmp / 'runs'}"])).best_checkpoint
        for t in ("segmentation", "harmonization")
    }
    s = args.size
    person_img = SyntheticPersons(1, size=s, seed=3).load(0)[0]
    bg_img = textured_background(np.random.default_rng(1), s, s)
    person, background = encode_png(person_img), encode_png(bg_img)

    alpha = np.random.default_rng(0).random((s, s)).astype(np.float32)
    mask = (alpha * 255).astype(np.uint8)
    work = []
    for _ in range(50):
        t0 = time.perf_counter()
        input_features(person_img), alpha_features(alpha), input_features(bg_img), colour_change(bg_img, bg_img, mask)
        work.append(time.perf_counter() - t0)

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = [
        f"port={port}",
        f"segmentation.source={ckpts['segmentation']}",
        f"harmonization.source={ckpts['harmonization']}",
    ]
    url = f"http://127.0.0.1:{port}"

    def call() -> float:
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/composite", files={"person": person, "background": background}, timeout=300)
        r.raise_for_status()
        return time.perf_counter() - t0

    results: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for mode in ("on", "off"):
            run(load_serve_config(None, [*base, f"monitoring.enabled={'true' if mode == 'on' else 'false'}"]))
            for _ in range(5):
                call()
            if mode == "on":  # the drift reference is computed in the background: let it finish first
                end = time.time() + 120
                while time.time() < end and any(
                    m.get("reference") == "pending"
                    for m in requests.get(f"{url}/v1/monitor", timeout=30).json()["models"].values()
                ):
                    time.sleep(0.5)
            results[mode] += [call() for _ in range(args.requests)]

    lines = [
        f"machine: {os.cpu_count()} CPUs; {s}×{s} person + background; tiny models; 1 client; {args.rounds} × "
        f"{args.requests} requests per mode",
        "monitoring work per /v1/composite in process (features of 2 inputs, alpha, colour change): median "
        f"{statistics.median(work) * 1000:.2f} ms",
        f"{'monitoring':>10s} {'p50 ms':>7s} {'p95 ms':>7s}",
    ]
    for mode, lat in results.items():
        lines.append(f"{mode:>10s} {statistics.median(lat) * 1000:7.1f} {pct(lat, 0.95) * 1000:7.1f}")
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    lines.append(f"p50 on ÷ off: {on / off:.3f} ({(on / off - 1) * 100:+.1f} %)")
    print("\n".join(lines))
    if args.docs:
        from docs_table import write_block

        command = "python bench/monitoring_bench.py " + " ".join(sys.argv[1:])
        print(f"wrote {write_block('docs/monitoring.md', 'monitoring_bench', chr(10).join(lines), command.strip())}")
    from ray import serve

    serve.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
