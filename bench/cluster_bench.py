"""What a lost node costs on a cluster of several nodes: each scenario against the same work
undisturbed, in one run, on this machine with Ray's own multi-node tools. Runs log to a real
``mlflow server`` over HTTP, as on a cluster's head; every node is 1 CPU and the head has none.

- ``fit``: a 2-worker segmentation fit (the smoke config) on ``ray.cluster_utils.Cluster`` (three
  worker nodes, one spare, sharing this machine's disk) whose worker's node is removed as soon as
  its first checkpoint is on storage (``scaling.max_failures=1``: Ray Train restarts the worker
  group from that checkpoint on the nodes left).
- ``fit-s3``: the same with the run folder on S3 (moto's server): the nodes share no disk.
- ``sweep-s3``: a one-trial sweep on S3 (``base.scaling.max_failures=1``) whose trial loses its node;
  the sweep must finish and register its champion.
- ``serve``: two segmentation replicas and the ingress on worker nodes under steady traffic from
  ``--clients`` clients; the node of a replica is removed and a replacement node added.
- ``autoscaler``: a 1-worker fit (1 CPU: one node each) submitted with ``montage submit`` to an
  autoscaling head (Ray's fake multi-node provider, none of its worker nodes up at the start) whose
  only worker node dies after the first checkpoint: the restart waits for the autoscaler to launch
  a replacement. Both fits start on an empty cluster and pay a node launch.

    python bench/cluster_bench.py [--scenarios fit,fit-s3,sweep-s3,serve,autoscaler] [--epochs 4]
                                  [--samples 256] [--clients 4] [--docs]

For each training it prints both walls, the time lost, the restart time and the epochs redone; for
Serve the requests sent and failed and how long after the removal the service answered again.
``--docs`` writes the report into the ``cluster_bench`` block of docs/cluster.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray 2.60 clusters run with token authentication (read when Ray is imported): one token for this run, in the
# environment every node, job and client it starts inherits, as the tests do
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the servers and node-loss helpers the multi-node tests use

SCENARIOS = ("fit", "fit-s3", "sweep-s3", "serve", "autoscaler")
DOC, BLOCK = "docs/cluster.md", "cluster_bench"


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    tracking: Any  # cluster_helpers.MlflowServer
    s3: Any = None  # cluster_helpers.S3Endpoint, for the S3 scenarios


@dataclass
class Training:
    """One training as it ran: its wall and, from MLflow, when each epoch was logged."""

    started: float  # time.time()
    wall_s: float
    steps: list[int]  # the epochs logged, in order
    ends: dict[int, float]  # epoch → when it was logged (the later time for an epoch logged twice)
    starts: int  # worker-group starts (the run's montage.starts tag)


def measured(bench: Bench, run_id: str, started: float, wall_s: float) -> Training:
    import mlflow

    client = mlflow.MlflowClient(bench.tracking.uri)
    history = sorted(client.get_metric_history(run_id, "epoch"), key=lambda m: m.timestamp)
    starts = int(client.get_run(run_id).data.tags.get("montage.starts", 0))
    return Training(started, wall_s, [int(m.step) for m in history], {int(m.step): m.timestamp / 1000 for m in history},
                    starts)  # fmt: skip


def run_id_by_name(bench: Bench, name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(bench.tracking.uri)
    exp = client.get_experiment_by_name("montage-segmentation")
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return run.info.run_id


def timed(work: Callable[[], Any]) -> tuple[Any, float, float]:
    started, t0 = time.time(), time.perf_counter()
    return work(), started, time.perf_counter() - t0


def losing_a_node(work: Callable[[], Any], lose: Callable[[], float | None]) -> tuple[Any, float, float, float]:
    """Run ``work`` while a thread calls ``lose`` until it returns when it took a node away; returns
    what ``work`` returned, when it started, its wall and when the node went."""
    removed: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not removed:
            if (at := lose()) is not None:
                removed.append(at)
            done.wait(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        out, started, wall = timed(work)
    finally:
        done.set()
        thread.join(timeout=120)
    if not removed:
        raise RuntimeError("the work ended before a node was taken away")
    return out, started, wall, removed[0]


def training_rows(base: Training, lost: Training, removed: float) -> list[tuple[str, str, str]]:
    epochs = max(base.ends)
    epoch_s = statistics.median(base.ends[e] - base.ends[e - 1] for e in range(2, epochs + 1))
    resumed = min(e for e, t in lost.ends.items() if t > removed) - 1  # the checkpoint the restart resumed from
    redone_s = removed - (lost.ends[resumed] if resumed else lost.started)
    base_span, lost_span = (t.ends[epochs] - t.ends[1] for t in (base, lost))
    return [
        ("undisturbed, wall", f"{base.wall_s:.1f} s", f"{epochs} epochs, {epoch_s:.1f} s per epoch"),
        ("lost a node, wall", f"{lost.wall_s:.1f} s",
         f"{lost.wall_s / base.wall_s:.2f}× undisturbed; worker-group starts: {lost.starts}"),
        ("time lost", f"{lost.wall_s - base.wall_s:.1f} s", "difference of the two walls"),
        ("time lost after epoch 1", f"{lost_span - base_span:.1f} s",
         f"epoch 1 → {epochs} of each (without the start-up, which varies most)"),
        ("restart time", f"{lost.ends[resumed + 1] - removed - epoch_s:.1f} s",
         "removal → the first epoch after it done, minus one epoch"),
        ("epochs redone", f"{redone_s / epoch_s:.2f}",
         f"{redone_s:.1f} s of training: removal − end of epoch {resumed}, the checkpoint it resumed from"),
        ("epochs logged", ", ".join(map(str, lost.steps)), "one MLflow run"),
    ]  # fmt: skip


def table(title: str, rows: list[tuple[str, str, str]]) -> str:
    width = max(len(r[0]) for r in rows)
    return "\n".join([title, *(f"  {name.ljust(width)}  {value:>10}  {note}" for name, value, note in rows)])


def smoke_config(bench: Bench, *overrides: str):
    """The segmentation smoke config at this bench's epochs and samples, logging to its MLflow server."""
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS

    return load_config("segmentation", TASKS.get("segmentation").spec, packaged_config("segmentation-smoke"), [
        f"train.epochs={bench.args.epochs}", f"data.synthetic_train={bench.args.samples}",
        f"tracking.uri={bench.tracking.uri}", "tracking.log_model=false", *overrides,
    ])  # fmt: skip


def fit_config(bench: Bench, name: str, failures: int, storage: str, endpoint: str):
    where = [f"run.storage={storage}", *([f"run.storage_endpoint={endpoint}"] if endpoint else [])]
    return smoke_config(bench, "scaling.workers=2", f"scaling.max_failures={failures}", f"run.name={name}", *where)


def checkpointed(bench: Bench, storage: str, name: str) -> Callable[[], bool]:
    """Whether the run ``name`` under ``storage`` (a folder or s3://bucket/prefix) has a checkpoint."""
    if storage.startswith("s3://"):
        bucket, _, prefix = storage[len("s3://") :].partition("/")
        return lambda: any("/checkpoint_" in k for k in bench.s3.keys(bucket, f"{prefix}/{name}/"))
    return lambda: any((Path(storage) / name).glob("checkpoint_*"))


def remove_when(cluster, ready: Callable[[], bool]) -> Callable[[], float | None]:
    from node_loss import remove_train_node

    return lambda: remove_train_node(cluster) if ready() else None


def fit_scenario(bench: Bench, cluster, s3: bool) -> str:
    from node_loss import add_worker_node

    from montage.launch.train import fit_ray

    storage = f"s3://{bench.s3.bucket('fit')}/runs" if s3 else str(bench.tmp / "runs")
    endpoint = bench.s3.url if s3 else ""
    tag = "fit-s3" if s3 else "fit"
    base, started, wall = timed(lambda: fit_ray(fit_config(bench, f"{tag}-undisturbed", 0, storage, endpoint)))
    if base.error:
        raise RuntimeError(f"the undisturbed fit failed: {base.error}")
    undisturbed = measured(bench, base.mlflow_run_id, started, wall)
    lost, started, wall, removed = losing_a_node(
        lambda: fit_ray(fit_config(bench, f"{tag}-lost", 1, storage, endpoint)),
        remove_when(cluster, checkpointed(bench, storage, f"{tag}-lost")),
    )
    add_worker_node(cluster)  # the spare for the next scenario
    if lost.error:
        raise RuntimeError(f"the fit that lost a node did not recover: {lost.error}")
    where = "the run folder on S3, nodes share no disk" if s3 else "the run folder on this machine's shared disk"
    return table(f"{tag}: a 2-worker fit loses a worker's node after its first checkpoint ({where})",
                 training_rows(undisturbed, measured(bench, lost.mlflow_run_id, started, wall), removed))  # fmt: skip


def sweep_scenario(bench: Bench, cluster) -> str:
    from node_loss import add_worker_node

    from montage.launch.tune import load_tune_config, run_sweep

    bucket = bench.s3.bucket("sweep")

    def sweep(name: str, failures: int):
        tcfg, base, params = load_tune_config(ROOT / "tune_configs" / "segmentation-tiny.yaml", [
            "base=segmentation-smoke", f"base.train.epochs={bench.args.epochs}",
            f"base.data.synthetic_train={bench.args.samples}",
            f"base.scaling.max_failures={failures}", "num_samples=1", "scheduler.name=none", "resources.workers=2",
            f"storage=s3://{bucket}/sweeps", f"storage_endpoint={bench.s3.url}", f"name={name}",
        ])  # fmt: skip
        result = run_sweep(tcfg, base, params)
        (trial,) = result.table
        if result.errors or trial.status != "finished" or result.registered is None:
            raise RuntimeError(f"the sweep {name} did not finish and register: {result.errors or trial.status}")
        return trial

    trial, started, wall = timed(lambda: sweep("sweep-undisturbed", 0))
    undisturbed = measured(bench, trial.mlflow_run_id, started, wall)
    trial, started, wall, removed = losing_a_node(
        lambda: sweep("sweep-lost", 1), remove_when(cluster, checkpointed(bench, f"s3://{bucket}/sweeps", "sweep-lost"))
    )
    add_worker_node(cluster)
    return table("sweep-s3: a one-trial sweep (2 workers, run and Tune state on S3) loses the trial's node; "
                 "both sweeps finish and register their champion",
                 training_rows(undisturbed, measured(bench, trial.mlflow_run_id, started, wall), removed))  # fmt: skip


def serve_scenario(bench: Bench, cluster) -> str:
    import cv2
    import numpy as np
    import requests
    from cluster_helpers import free_port
    from node_loss import Traffic, add_worker_node, node_of_replica, serve_segmentation
    from ray import serve

    from montage.launch.local import fit_local

    # any weights do: what is measured is the service
    where = [f"run.storage={bench.tmp / 'runs'}", "run.name=served"]
    model = smoke_config(bench, "train.epochs=1", "train.max_steps=1", "tracking.enabled=false", *where)
    url = serve_segmentation(fit_local(model).best_checkpoint, free_port())
    image = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))[1].tobytes()
    if requests.post(url, files={"image": image}, timeout=60).status_code != 200:
        raise RuntimeError("the Serve application does not answer")
    clients, calm_s = bench.args.clients, 10.0
    with Traffic(url, image, clients=clients) as traffic:
        started = time.time()
        time.sleep(calm_s)
        victim = node_of_replica(cluster)
        removed = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        add_worker_node(cluster)  # the replacement capacity a cluster would bring
        traffic.wait_answered(removed + 1, 300)
        time.sleep(calm_s)  # and how it answers once back
    serve.shutdown()
    out = traffic.outage(removed)
    back = removed + out.back_s
    after_back = [c for c in out.after if c.sent > back]

    def rate(calls, seconds: float) -> tuple[str, str]:
        p50 = statistics.median(c.answered - c.sent for c in calls) * 1000 if calls else float("nan")
        return f"{len(calls) / seconds:.1f}/s", f"p50 {p50:.0f} ms over {len(calls)} requests"

    ended = max(c.answered for c in out.after)
    failed_in_flight = sum(c.sent < removed for c in out.failed)
    rows = [
        ("clients", str(clients), "each posts a 48×48 PNG to /v1/segment, one request at a time, 0.05 s apart"),
        ("undisturbed", *rate([c for c in out.before if c.sent >= started], removed - started)),
        ("sent after the removal", str(len(out.after)), "answered from the removal until the traffic stopped"),
        ("failed", str(len(out.failed)), f"{failed_in_flight} of them sent before the removal; "
         f"{out.in_flight} requests were in flight at the removal"),
        ("answered again after", f"{out.back_s:.1f} s", "removal → the first 200 after the last failure (if any)"),
        ("longest wait for a 200", f"{out.longest_gap_s:.1f} s", "from the removal on, across all clients"),
        ("once back", *rate(after_back, ended - back)),
    ]  # fmt: skip
    return table("serve: two segmentation replicas and the ingress on worker nodes; the node of a replica is "
                 "removed under steady traffic and a replacement node added", rows)  # fmt: skip


def autoscaler_scenario(bench: Bench) -> str:
    from cluster_helpers import AutoscalingHead, kill_node, raylet_of_train_worker, submit, wait_until

    runs = bench.tmp / "autoscaled"
    head = AutoscalingHead(bench.tmp / "autoscaling", {"cpu": {"resources": {"CPU": 1}, "max_workers": 2}}).start()

    def train(name: str, failures: int) -> None:
        rc = submit(head, bench.tracking.uri, "train", "segmentation", "--config", "segmentation-smoke",
                    f"train.epochs={bench.args.epochs}", f"data.synthetic_train={bench.args.samples}",
                    "scaling.workers=1", "scaling.cpus_per_worker=1", f"scaling.max_failures={failures}",
                    f"run.storage={runs}", f"run.name={name}", "tracking.log_model=false")  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"montage submit train ({name}) exited {rc}")

    def kill_when_checkpointed() -> float | None:
        if not any((runs / "autoscaler-lost").glob("checkpoint_*")) or not (raylet := raylet_of_train_worker(head.gcs)):
            return None
        at = time.time()
        kill_node(raylet)
        return at

    def no_worker_nodes() -> bool:
        try:
            return head.worker_nodes() == 0
        except Exception:  # noqa: BLE001 - the state API may time out under load: ask again
            return False

    try:
        _, started, wall = timed(lambda: train("autoscaler-undisturbed", 0))
        undisturbed = measured(bench, run_id_by_name(bench, "autoscaler-undisturbed"), started, wall)
        wait_until(no_worker_nodes, 300, "the idle worker node to be removed", every=1)
        _, started, wall, removed = losing_a_node(lambda: train("autoscaler-lost", 1), kill_when_checkpointed)
        lost = measured(bench, run_id_by_name(bench, "autoscaler-lost"), started, wall)
    finally:
        head.stop()
    return table("autoscaler: a 1-worker fit submitted to an autoscaling head (worker nodes of 1 CPU, min 0 / max 2) "
                 "loses its only node after its first checkpoint; the restart waits for a new node",
                 training_rows(undisturbed, lost, removed))  # fmt: skip


def run(bench: Bench, scenarios: list[str]) -> list[str]:
    """Each scenario's report, in order; the Cluster's scenarios share one cluster, stopped before the
    autoscaling head starts (one Ray on the machine at a time)."""
    import ray

    report: list[str] = []

    def timed_scenario(name: str, work: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        report.append(work())
        print(report[-1] + "\n", flush=True)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    on_cluster = [s for s in scenarios if s != "autoscaler"]
    if on_cluster:
        from cluster_helpers import wait_placement_groups_removed
        from node_loss import lost_node_cluster

        cluster = lost_node_cluster(logging_level="WARNING", log_to_driver=False)
        try:
            work = {
                "fit": lambda: fit_scenario(bench, cluster, s3=False),
                "fit-s3": lambda: fit_scenario(bench, cluster, s3=True),
                "sweep-s3": lambda: sweep_scenario(bench, cluster),
                "serve": lambda: serve_scenario(bench, cluster),
            }
            for name in on_cluster:
                wait_placement_groups_removed(120, "the scenario before")
                timed_scenario(name, work[name])
        finally:
            ray.shutdown()
            cluster.shutdown()
    if "autoscaler" in scenarios:
        timed_scenario("autoscaler", lambda: autoscaler_scenario(bench))
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=256, help="synthetic training samples (sets the epoch length)")
    p.add_argument("--clients", type=int, default=4, help="Serve: clients sending requests at once")
    p.add_argument("--docs", action="store_true", help=f"also write the report into the {BLOCK} block of {DOC}")
    args = p.parse_args()
    scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]  # in the order above, whatever was asked
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown or not scenarios or args.epochs < 2:
        p.error(f"unknown scenarios {sorted(unknown)}" if unknown else "name a scenario; --epochs must be >= 2")
    from cluster_helpers import MlflowServer, S3Endpoint

    tmp = Path(tempfile.mkdtemp(prefix="montage-cluster-bench-"))
    bench = Bench(args, tmp, MlflowServer(tmp / "mlflow").start())
    os.environ["MLFLOW_TRACKING_URI"] = bench.tracking.uri  # the sweep's runs, and anything that asks MLflow
    try:
        if {"fit-s3", "sweep-s3"} & set(scenarios):
            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
            bench.s3 = S3Endpoint()
            os.environ.update(bench.s3.env)
        report = run(bench, scenarios)
    finally:
        if bench.s3:
            bench.s3.stop()
        bench.tracking.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.docs:
        from docs_table import publish

        publish(DOC, BLOCK, "\n\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
