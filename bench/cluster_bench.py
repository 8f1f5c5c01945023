"""What a lost node costs on a multi-node cluster: a 2-worker segmentation fit on
``ray.cluster_utils.Cluster`` (a head with 0 CPUs and three 1-CPU worker nodes on this machine, one
spare) whose worker node is removed as soon as its first checkpoint is on storage
(``scaling.max_failures=1``: Ray Train asks for a new placement group and restarts the worker group
on the spare node from that checkpoint), against the same fit undisturbed, in one run. Runs log to
a real ``mlflow server`` over HTTP, as on a cluster's head.

    python bench/cluster_bench.py [--epochs 6] [--samples 256] [--write docs/cluster.md]

Prints both wall times and their ratio, the time lost, the restart time and the epochs redone, and
writes the table between the ``cluster-bench`` markers of the docs file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the MLflow server and port helpers the multi-node tests use


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples", type=int, default=256, help="synthetic training samples (sets the epoch length)")
    p.add_argument("--write", default=str(ROOT / "docs" / "cluster.md"), help="docs file to update ('' = none)")
    args = p.parse_args()
    import mlflow
    import ray
    from cluster_helpers import MlflowServer, free_port, parent_pid
    from ray.cluster_utils import Cluster

    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS
    from montage.launch.session import train_worker_pids
    from montage.launch.train import fit_ray

    tmp = Path(tempfile.mkdtemp(prefix="montage-cluster-bench-"))
    server = MlflowServer(tmp / "mlflow").start()
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_initial_delay_ms": 0}
    head = {"num_cpus": 0, "dashboard_agent_listen_port": free_port(), "_system_config": health}
    cluster = Cluster(initialize_head=True, connect=True, head_node_args=head)
    for _ in range(3):
        cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()

    def config(name: str, failures: int):
        return load_config("segmentation", TASKS.get("segmentation").spec, packaged_config("segmentation-smoke"), [
            "scaling.workers=2", f"scaling.max_failures={failures}", f"train.epochs={args.epochs}",
            f"data.synthetic_train={args.samples}", f"run.name={name}", f"run.storage={tmp / 'runs'}",
            f"tracking.uri={server.uri}", "tracking.log_model=false",
        ])  # fmt: skip

    def epoch_times(run_id: str) -> dict[int, float]:
        history = mlflow.MlflowClient(server.uri).get_metric_history(run_id, "epoch")
        return {int(m.step): m.timestamp / 1000 for m in history}

    def node_of_a_worker():
        pids = set(train_worker_pids())
        for node in cluster.list_all_nodes():
            if not node.head and any(parent_pid(pid) == node.all_processes["raylet"][0].process.pid for pid in pids):
                return node
        return None

    try:
        t0 = time.perf_counter()
        base = fit_ray(config("undisturbed", 0))
        base_s = time.perf_counter() - t0
        ends = epoch_times(base.mlflow_run_id)
        epoch_s = statistics.median(ends[e] - ends[e - 1] for e in range(2, args.epochs + 1))
        base_span = ends[args.epochs] - ends[1]  # without start-up, which the first fit on new nodes pays most

        removed_at: list[float] = []
        run_dir = tmp / "runs" / "lost"

        def remove_after_first_checkpoint() -> None:
            while not removed_at:
                if any(run_dir.glob("checkpoint_*")) and (node := node_of_a_worker()) is not None:
                    removed_at.append(time.time())
                    cluster.remove_node(node, allow_graceful=False)
                time.sleep(0.05)

        threading.Thread(target=remove_after_first_checkpoint, daemon=True).start()
        t0 = time.perf_counter()
        out = fit_ray(config("lost", 1))
        lost_s = time.perf_counter() - t0
        if out.error or not removed_at:
            print(f"the fit that lost a node did not recover: {out.error or 'no node was removed'}")
            return 1
        ends = epoch_times(out.mlflow_run_id)
        kill = removed_at[0]
        done_before = [e for e, t in ends.items() if t < kill]
        checkpointed = max(done_before)  # the removal waited for this epoch's checkpoint
        first_after = min(t for t in ends.values() if t > kill)
        rows = [
            ("undisturbed fit, wall", f"{base_s:.1f} s", f"{args.epochs} epochs, {epoch_s:.1f} s per epoch"),
            ("fit that lost a node, wall", f"{lost_s:.1f} s",
             f"{lost_s / base_s:.2f}× undisturbed; restarts reported: {out.restarts}"),
            ("time lost", f"{lost_s - base_s:.1f} s", "difference of the two walls"),
            ("time lost after epoch 1", f"{ends[args.epochs] - ends[1] - base_span:.1f} s",
             f"epoch 1 → {args.epochs} of each fit (no start-up: the first fit on new nodes pays more of it)"),
            ("restart time", f"{first_after - kill - epoch_s:.1f} s",
             "node removed → first epoch of the new worker group done, minus one epoch"),
            ("training redone", f"{kill - ends[checkpointed]:.1f} s",
             f"removal − the checkpoint of epoch {checkpointed} it resumed from (checkpoints every epoch)"),
            ("epochs logged", ", ".join(str(e) for e in sorted(ends)), "one MLflow run, each epoch once"),
        ]  # fmt: skip
        width = max(len(r[0]) for r in rows)
        lines = [f"{name.ljust(width)}  {value:>10}  {note}" for name, value, note in rows]
        print("\n".join(lines))
        if args.write:
            _write(Path(args.write), lines, args)
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _write(path: Path, lines: list[str], args: argparse.Namespace) -> None:
    begin, end = "<!-- cluster-bench -->", "<!-- /cluster-bench -->"
    text = path.read_text()
    if begin not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block to fill")
    command = f"python bench/cluster_bench.py --epochs {args.epochs} --samples {args.samples}"
    block = f"{begin}\n`{command}`, {time.strftime('%Y-%m-%d')}, this 2-core machine:\n\n```\n"
    block += "\n".join(lines) + f"\n```\n{end}"
    head, rest = text.split(begin, 1)
    path.write_text(head + block + rest.split(end, 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
