"""montage on clusters of several nodes, on this one machine with Ray's own multi-node tools: an
autoscaling head (Ray's fake multi-node provider brings worker nodes on demand and removes them
when idle) and ``ray.cluster_utils.Cluster`` (raylets added and removed by hand). Runs log to a real
MLflow server over HTTP, as on a cluster's head.

(conftest.py runs this module before any test starts the shared in-process Ray session.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import mlflow
import pytest
from cluster_helpers import AutoscalingHead, MlflowServer, submit, wait_until
from node_loss import add_worker_node, lost_node_cluster

from montage.launch.session import train_worker_pids
from montage.launch.train import fit_ray

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "base.train.epochs=1", "base.data.size=32", "base.data.synthetic_train=16", "base.data.synthetic_val=8",
    "base.model.decoder_channels=[8,8,8,8,8]", "base.train.max_steps=2", "scheduler.grace_period=1",
]  # fmt: skip
pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)
IDLE_REMOVAL_S = 300


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3():
    from cluster_helpers import S3Endpoint

    endpoint = S3Endpoint()
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="class")
def autoscaling(tmp_path_factory, s3):
    """A head with 0 CPUs and one worker type of 1 CPU, at most 3 nodes, none at the start (Ray's fake
    provider keeps counting a node whose raylet was killed as one still starting). Its processes hold the
    credentials of ``s3`` (moto's S3 server), as a cluster's nodes hold those of their bucket."""
    head = AutoscalingHead(tmp_path_factory.mktemp("autoscaling"), {"cpu": {"resources": {"CPU": 1}, "max_workers": 3}})
    head.start(env=s3.env)
    yield head
    head.stop()


def _nodes_seen(head: AutoscalingHead):
    """Watch the alive worker nodes in the background; calling the result stops and returns the IDs of
    every worker node seen alive."""
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.update(head.worker_node_ids())
            except Exception:  # noqa: BLE001 - the state API may time out under load: try again
                pass
            done.wait(1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def stop() -> set[str]:
        done.set()
        thread.join()
        return seen

    return stop


class TestAutoscaling:
    """The autoscaling head's tests (its fixture is class-scoped: the head, idle ~8 % of a core with its
    once-a-second autoscaler, stops before the lost-node tests instead of at the module's end)."""

    def test_a_trial_no_node_type_can_hold_fails_at_once(self, autoscaling, tracking, tmp_path) -> None:
        """No node type of the autoscaler has a GPU: a sweep whose trials ask for one is refused before
        anything starts (the driver here, on the head's machine), naming the resource."""
        started = time.time()
        out = subprocess.run(
            [sys.executable, "-m", "montage", "tune", "tune_configs/segmentation-tiny.yaml", *TINY,
             "resources.gpus=true", f"storage={tmp_path / 'tune'}", "--address", autoscaling.gcs],
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking.uri}, cwd=ROOT,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert "no node type of the autoscaler can hold it" in out.stderr and "not enough GPU" in out.stderr
        assert time.time() - started < 60
        assert autoscaling.worker_nodes() == 0  # nothing was asked of the autoscaler

    @pytest.mark.timeout(900)
    def test_a_sweep_on_object_storage_grows_an_autoscaling_cluster_and_gets_a_replacement_for_a_lost_node(
        self, autoscaling, tracking, s3
    ) -> None:
        """The head can run nothing (0 CPUs): the sweep's trial (a fit of one 1-CPU worker with
        ``base.scaling.max_failures=1``) waits for the autoscaler, which starts worker nodes for it (a trial's
        Tune actor and its worker cannot share a 1-CPU node). The sweep's state, its trial's run folder and
        checkpoints live on S3 (as on a cluster whose nodes share no disk but the bucket). No spare node: the
        node of the trial's worker dies (its raylet killed) after its first checkpoint, so its restart waits
        for the autoscaler to launch a replacement; the trial then finishes from that checkpoint on the bucket
        (one FINISHED run, every epoch once, two starts), its model is registered from the bucket as the
        champion, once, and the autoscaler removes the nodes once idle. (One trial: the sweep takes the same
        path for each, and a second costs a Ray fit. A plain fit takes the same path too: a trial is a
        ``TorchTrainer`` fit with montage's failure config and resume; a 2-worker fit on the cluster below
        loses worker processes.)"""
        from cluster_helpers import kill_node, raylet_of_train_worker

        assert autoscaling.worker_nodes() == 0
        seen = _nodes_seen(autoscaling)
        bucket = s3.bucket("grow")
        # FIFO: a trial ASHA stops would keep its node up for 180 s more (below)
        sweep = [
            "tune", str(ROOT / "tune_configs" / "segmentation-tiny.yaml"), *TINY, "base.train.epochs=4",
            "base.scaling.max_failures=1", "resources.cpus_per_worker=1", "num_samples=1",
            "scheduler.name=none", f"storage=s3://{bucket}/sweeps", f"storage_endpoint={s3.url}", "name=grow",
        ]  # fmt: skip
        out: dict = {}
        job = threading.Thread(target=lambda: out.update(rc=submit(autoscaling, tracking.uri, *sweep)))
        job.start()
        wait_until(
            lambda: any("/checkpoint_" in k for k in s3.keys(bucket, "sweeps/grow/")), 600, "the first checkpoint"
        )
        raylet = wait_until(
            lambda: raylet_of_train_worker(autoscaling.gcs), 60, "the raylet of the training's worker node"
        )
        before = autoscaling.worker_node_ids()
        kill_node(raylet)
        job.join(timeout=780)
        assert out.get("rc") == 0
        nodes = seen()
        assert len(nodes) >= 2  # the autoscaler started worker nodes for the trial (its actor, its worker)
        assert nodes - before, "no node was launched after the node was lost"

        client = mlflow.MlflowClient(tracking.uri)
        versions = client.search_model_versions("name = 'montage-segmentation'")
        assert len(versions) == 1  # the champion, once
        assert client.get_model_version_by_alias("montage-segmentation", "champion").version == versions[0].version
        exp = client.get_experiment_by_name("montage-segmentation")
        runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("montage.sweep") == "grow"]
        tags = ("montage.trial_status", "montage.error", "montage.starts")
        ended = [(r.info.run_name, r.info.status, *(r.data.tags.get(t) for t in tags)) for r in runs]
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), ended  # the parent and the trial
        trial_runs = [r for r in runs if "montage.trial" in r.data.tags]
        assert [r.data.tags["montage.starts"] for r in trial_runs] == ["2"], ended  # one restart
        for run in trial_runs:
            assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")) == [1, 2, 3, 4]
            assert run.data.tags["montage.run_dir"].startswith(f"s3://{bucket}/sweeps/grow/")  # its folder: the bucket
        assert versions[0].run_id in {r.info.run_id for r in trial_runs}  # registered from a trial's checkpoint
        # the idle timeout is 6 s, but a node stays while anything asks for it: Ray Train asks the autoscaler
        # for each trial's workers and withdraws the request when the trial's controller shuts down; a trial
        # that ASHA stops is ended with its controller, and its request stands until it expires (180 s)
        started = time.time()
        wait_until(lambda: autoscaling.worker_nodes() == 0, IDLE_REMOVAL_S, "idle worker nodes to be removed")
        print(f"worker nodes removed {time.time() - started:.0f} s after the sweep")


# ------------------------------------------------------------------------------ a cluster that loses nodes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head with 0 CPUs (this process is its driver) and three 1-CPU worker nodes on this machine's
    disk; dead nodes are noticed within ~2 s. A test that removes a node adds a replacement."""
    import ray

    c = lost_node_cluster()
    yield c
    ray.shutdown()
    c.shutdown()


def test_a_local_tracking_store_is_refused_on_a_cluster_of_several_nodes(cluster, tiny_config, monkeypatch, tmp_path):
    """A relative SQLite store would be one database per node: fit_ray and run_sweep refuse it on this
    4-node cluster before anything is created or any worker starts, and say to use the head's server."""
    from montage.core.config import ConfigError
    from montage.launch import train
    from montage.launch.tune import load_tune_config, run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(train, "make_trainer", lambda *a, **k: pytest.fail("a trainer was made"))
    refused = r"tracking URI sqlite:///\S+/mlruns\.db is a local file, but this Ray cluster has 4 nodes.*mlflow server"
    cfg = tiny_config("segmentation", "tracking.uri=sqlite:///mlruns.db", "run.name=refused")
    (tmp_path / "mlruns.db").unlink()  # the store tiny_config made for its own URI, which the override replaced
    with pytest.raises(ConfigError, match=refused + r".*MLFLOW_TRACKING_URI=http://<head-ip>:5000"):
        train.fit_ray(cfg)
    tcfg, base, params = load_tune_config(
        ROOT / "tune_configs" / "segmentation-tiny.yaml", [*TINY, f"storage={tmp_path / 'tune'}", "name=refused"]
    )  # the default tracking URI: sqlite:///mlruns.db
    with pytest.raises(ConfigError, match=refused):
        run_sweep(tcfg, base, params)
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "runs" / "refused").exists()
    assert not (tmp_path / "tune" / "refused").exists()


def test_a_training_that_dies_ungracefully_gives_its_cpus_back(cluster, tiny_config, tmp_path) -> None:
    """A training whose driver dies mid-run (as a trial Tune stops, or a killed sweep's) leaves its
    placement group to Ray Train's ``PlacementGroupCleaner``, which asks the dashboard's State API
    whether the controller lives: on a Ray without a dashboard it never answers, the group keeps its
    CPUs for as long as the cluster lives, and the next sweep waits for them forever. (Every Ray montage
    starts or joins has its dashboard, this cluster's head too; with other Rays on the machine the nodes
    are told which dashboard is theirs.)"""
    import ray
    from cluster_helpers import live_placement_groups, wait_placement_groups_removed

    cfg = tiny_config("harmonization", "train.epochs=200", "train.max_steps=2", "run.name=dies",
                      "tracking.enabled=false")  # fmt: skip
    driver = ray.remote(num_cpus=0)(fit_ray).remote(cfg)  # the training's driver, in a Ray worker process
    wait_until(lambda: any((tmp_path / "runs" / "dies").glob("checkpoint_*")), 180, "the first checkpoint")
    assert live_placement_groups()  # its workers hold their CPUs
    ray.cancel(driver, force=True)  # the driver's process dies; the controller it owns dies with it
    wait_placement_groups_removed(60, "a training whose driver was killed")


class Killer(threading.Thread):
    """SIGKILLs one training worker each time ``stored(n)`` first holds, for n = 1, 2, ... ``kills``
    (``stored(n)``: the run's n-th checkpoint is on storage)."""

    def __init__(self, stored: Callable[[int], bool], kills: int, every: float) -> None:
        super().__init__(daemon=True)
        self.stored, self.kills, self.every, self.stop = stored, kills, every, threading.Event()
        self.killed: list[tuple[int, float]] = []  # (pid, time)

    def run(self) -> None:
        while not self.stop.is_set() and len(self.killed) < self.kills:
            if self.stored(len(self.killed) + 1):
                dead = {pid for pid, _ in self.killed}
                pids = [p for p in train_worker_pids() if p not in dead]
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    self.killed.append((pids[-1], time.time()))
                    continue
            time.sleep(self.every)


def _one_run(cfg):
    client = mlflow.MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    return client, runs[0]


def test_killed_workers_restart_once_then_fail_clearly_and_resume_from_the_bucket(
    cluster, tracking, s3, tiny_config, monkeypatch, capsys
) -> None:
    """Failures under Ray Train: a 2-worker fit across two worker nodes, ``scaling.max_failures=1``, its run
    on object storage (moto's S3 server). A worker process SIGKILLed after the first checkpoint: the group
    restarts from it into the same MLflow run. A worker of the restarted group killed after its first
    checkpoint: no restart left, the fit fails naming what to do (``--resume s3://...``) and its run is
    FAILED. ``montage train --resume s3://...`` then finishes the run from the bucket's latest checkpoint,
    into the same MLflow run (three starts, every epoch once), and the bucket keeps
    ``scaling.keep_checkpoints`` (2) best checkpoints by the task's metric plus the latest."""
    from montage.cli import main

    bucket = s3.bucket("faults")
    overrides = ["train.epochs=4", "data.synthetic_train=384", f"run.storage=s3://{bucket}/runs",
                 f"run.storage_endpoint={s3.url}"]  # fmt: skip
    for k, v in s3.env.items():  # the driver's credentials, which montage hands its workers
        monkeypatch.setenv(k, v)
    tracked = [f"tracking.uri={tracking.uri}", "tracking.experiment=montage-faults"]  # the server's own experiment
    cfg = tiny_config(
        "segmentation",
        *overrides,
        *tracked,
        "scaling.workers=2",
        "scaling.cpus_per_worker=1",  # on 1-CPU nodes beside a head of none: the group spans two nodes
        "scaling.max_failures=1",
        "run.name=dead",
    )

    def stored(n: int) -> bool:
        """Ray Train writes its checkpoint list once a checkpoint is complete on the bucket: n reports listed."""
        body = s3.read(bucket, "runs/dead/checkpoint_manager_snapshot.json")
        return body is not None and json.loads(body)["current_report_index"] >= n

    killer = Killer(stored, kills=2, every=0.2)
    killer.start()
    try:
        out = fit_ray(cfg)
    finally:
        killer.stop.set()
    assert len(killer.killed) == 2, f"{len(killer.killed)} workers killed (the run ended first?)"
    assert out.error is not None and out.restarts == 1
    assert "worker process was lost" in out.error and "max_failures=1" in out.error
    assert f"--resume s3://{bucket}/runs/dead" in out.error
    client, run = _one_run(cfg)
    assert run.info.status == "FAILED" and "montage.error" in run.data.tags
    assert run.data.tags["montage.starts"] == "2" and run.info.run_id == out.mlflow_run_id
    # the restarted group trained: an epoch ended between the first kill and the second (what a restart costs is
    # measured by bench/restart_bench.py, against an undisturbed fit)
    ends = [m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "epoch")]
    after = [t for t in ends if killer.killed[0][1] < t < killer.killed[1][1]]
    assert after, "no epoch ended between the restart and the second kill"
    log.warning("restart: first epoch after the kill done %.1f s later", min(after) - killer.killed[0][1])

    capsys.readouterr()
    args = ["train", "segmentation", "--config", "segmentation-smoke", *overrides, *tracked]
    # resumed on one worker (fewer than it started with, as after losing capacity), the resumed epochs at 2 steps
    # each: what is checked is where they land, not what they learn
    assert main([*args, "scaling.workers=1", "train.max_steps=2", "--resume", f"s3://{bucket}/runs/dead"]) == 0
    shown = json.loads(capsys.readouterr().out)
    client, run = _one_run(cfg)
    assert run.info.status == "FINISHED" and run.data.tags["montage.starts"] == "3"
    assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")) == [1, 2, 3, 4]
    iou = {int(m.step): m.value for m in client.get_metric_history(run.info.run_id, "val/iou")}
    best_two = set(sorted(iou, key=lambda e: -iou[e])[:2])
    kept = {c["epoch"]: c["path"] for c in shown["checkpoints"]}
    assert set(kept) == best_two | {4}, (iou, kept)
    in_bucket = {k.split("/")[2] for k in s3.keys(bucket, "runs/dead/checkpoint_") if k.count("/") > 2}
    assert in_bucket == {p.rstrip("/").rsplit("/", 1)[-1] for p in kept.values()}, (in_bucket, kept)
    assert all(p.startswith(f"s3://{bucket}/runs/dead/checkpoint_") for p in kept.values())


def test_serve_replicas_on_worker_nodes_survive_a_lost_node(cluster, tmp_path) -> None:
    """The Serve application with two segmentation replicas (and its ingress) on worker nodes, under a
    steady stream of requests from one client: the node of a replica is removed. Serve replaces what ran
    there; the requests that fail are at most those in flight on that node, and the service answers
    again within a bound (what it costs is measured by bench/cluster_bench.py's serve scenario)."""
    import ray
    import requests
    from node_loss import Traffic, node_of_replica, serve_segmentation
    from serve_helpers import checkpoints, free_port, img, png, stop_serve

    (ckpt,) = checkpoints(tmp_path, ("segmentation",)).values()
    url = serve_segmentation(ckpt, free_port())
    body = png(img(48, 48))
    assert requests.post(url, files={"image": body}, timeout=60).status_code == 200

    with Traffic(url, body, clients=1) as traffic:
        time.sleep(3)
        victim = node_of_replica(cluster)
        assert not victim.head
        removed = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        add_worker_node(cluster)  # the replacement capacity a cluster would bring
        traffic.wait_answered(removed + 1, 120)
        time.sleep(5)  # and keep answering
    out = traffic.outage(removed)
    print(f"serve lost a node: {len(out.failed)} of {len(out.after)} requests failed; answering again "
          f"{out.back_s:.1f} s after the removal")  # fmt: skip
    assert out.before and all(c.status == 200 for c in out.before)
    assert len(out.failed) <= 4  # the requests in flight on the removed node (one at a time here), plus its retries
    assert out.back_s < 60
    assert sum(c.answered > removed + out.back_s for c in out.after) >= 5  # once back, it kept answering
    stop_serve()
    assert ray.is_initialized()
