"""What a lost worker costs: a 2-worker segmentation TorchTrainer whose worker is SIGKILLed as
soon as its first checkpoint is on storage (``scaling.max_failures=1``: Ray Train restarts the
worker group from that checkpoint), against the same fit undisturbed, in one run.

    python bench/restart_bench.py [--epochs 6] [--samples 512]

Prints wall time of both fits and their ratio, the restart time (kill → the restarted group's
first finished epoch, minus one undisturbed epoch), the training lost (kill − last checkpoint),
and the epochs each fit logged to MLflow (each epoch once). POSIX (SIGKILLs the worker, found through Ray's State API).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--docs", action="store_true", help="also write the figures into docs/reliability.md")
    p.add_argument("--samples", type=int, default=512, help="synthetic training samples (sets the epoch length)")
    args = p.parse_args()
    import mlflow
    import ray

    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.launch.session import train_worker_pids
    from montage.launch.train import fit_ray

    tmp = Path(tempfile.mkdtemp(prefix="montage-restart-bench-"))
    ray.init(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    uri = f"sqlite:///{tmp / 'mlruns.db'}"

    def config(name: str, failures: int):
        return load_config(
            "segmentation",
            TASKS.get("segmentation").spec,
            packaged_config("segmentation-smoke"),
            [
                "scaling.workers=2",
                f"scaling.max_failures={failures}",
                f"train.epochs={args.epochs}",
                f"data.synthetic_train={args.samples}",
                f"run.name={name}",
                f"run.storage={tmp / 'runs'}",
                f"tracking.uri={uri}",
                f"tracking.artifacts={tmp / 'art'}",
                "tracking.log_model=false",
            ],
        )

    def epoch_times(run_id: str) -> dict[int, float]:
        return {int(m.step): m.timestamp / 1000 for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "epoch")}

    try:
        t0 = time.perf_counter()
        base = fit_ray(config("undisturbed", 0))
        base_s = time.perf_counter() - t0
        ends = epoch_times(base.mlflow_run_id)
        epoch_s = statistics.median(ends[e] - ends[e - 1] for e in range(2, args.epochs + 1))

        killed_at: list[float] = []
        run_dir = tmp / "runs" / "killed"

        def kill_after_first_checkpoint() -> None:
            while not killed_at:
                if any(run_dir.glob("checkpoint_*")) and (pids := train_worker_pids()):
                    os.kill(pids[-1], signal.SIGKILL)
                    killed_at.append(time.time())
                time.sleep(0.05)

        threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
        t0 = time.perf_counter()
        out = fit_ray(config("killed", 1))
        killed_s = time.perf_counter() - t0
        if out.error or not killed_at:
            print(f"the killed fit did not recover: {out.error or 'no worker was killed'}")
            return 1
        ends = epoch_times(out.mlflow_run_id)
        kill = killed_at[0]
        checkpointed = max(e for e, t in ends.items() if t < kill)  # the kill waited for this checkpoint
        first_after = min(t for t in ends.values() if t > kill)
        rows = [
            ("undisturbed fit, wall", f"{base_s:.1f} s", f"{args.epochs} epochs, {epoch_s:.1f} s per epoch"),
            (
                "killed fit, wall",
                f"{killed_s:.1f} s",
                f"{killed_s / base_s:.2f}× undisturbed; restarts reported: {out.restarts}",
            ),
            (
                "restart time",
                f"{first_after - kill - epoch_s:.1f} s",
                "kill → first epoch of the new worker group done, minus one epoch",
            ),
            (
                "training lost",
                f"{kill - ends[checkpointed]:.1f} s",
                f"kill − the checkpoint of epoch {checkpointed} it resumed from",
            ),
            ("epochs logged", ", ".join(str(e) for e in sorted(ends)), "one MLflow run, each epoch once"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name.ljust(width)}  {value:>10}  {note}" for name, value, note in rows]
        print("\n".join(lines))
        if args.docs:
            from docs_table import write_block

            command = "python bench/restart_bench.py " + " ".join(sys.argv[1:])
            print(f"wrote {write_block('docs/reliability.md', 'restart_bench', chr(10).join(lines), command.strip())}")
        return 0
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
