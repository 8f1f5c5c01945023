"""montage on clusters of several nodes, on this one machine with Ray's own multi-node tools: an
autoscaling head (Ray's fake multi-node provider brings worker nodes on demand and removes them
when idle) and ``ray.cluster_utils.Cluster`` (raylets added and removed by hand). Runs log to a real
MLflow server over HTTP, as on a cluster's head.

(conftest.py runs this module before any test starts the shared in-process Ray session.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from cluster_helpers import AutoscalingHead, MlflowServer, submit, wait_until
from node_loss import add_worker_node, lost_node_cluster, remove_train_node

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "base.train.epochs=1", "base.data.size=32", "base.data.synthetic_train=16", "base.data.synthetic_val=8",
    "base.model.decoder_channels=[8,8,8,8,8]", "base.train.max_steps=2", "scheduler.grace_period=1",
]  # fmt: skip
pytestmark = pytest.mark.slow
IDLE_REMOVAL_S = 300


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="class")
def autoscaling(tmp_path_factory):
    """A head with 0 CPUs and one worker type of 1 CPU, at most 2 nodes, none at the start."""
    head = AutoscalingHead(tmp_path_factory.mktemp("autoscaling"), {"cpu": {"resources": {"CPU": 1}, "max_workers": 2}})
    head.start()
    yield head
    head.stop()


def _most_nodes(head: AutoscalingHead):
    """Watch the worker-node count in the background; calling the result stops and returns the maximum."""
    import threading

    counts, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                counts.append(head.worker_nodes())
            except Exception:  # noqa: BLE001 - the state API may time out under load: try again
                pass
            done.wait(1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def stop() -> int:
        done.set()
        thread.join()
        return max(counts)

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
    def test_a_sweep_grows_an_autoscaling_cluster_from_nothing(self, autoscaling, tracking, tmp_path) -> None:
        """The head can run nothing (0 CPUs): the sweep's trials wait for the autoscaler, which starts worker
        nodes for them and removes them once idle; the champion is registered once."""
        assert autoscaling.worker_nodes() == 0
        most = _most_nodes(autoscaling)
        # FIFO: a trial ASHA stops keeps its node up for 180 s more (below), and ASHA's rung at this sweep's
        # only epoch would stop the worse of the two
        sweep = [
            "tune", str(ROOT / "tune_configs" / "segmentation-tiny.yaml"), *TINY, "num_samples=2", "max_concurrent=2",
            "scheduler.name=none", f"storage={tmp_path / 'tune'}", "name=grow",
        ]  # fmt: skip
        assert submit(autoscaling, tracking.uri, *sweep) == 0
        client = mlflow.MlflowClient(tracking.uri)
        versions = client.search_model_versions("name = 'montage-segmentation'")
        assert len(versions) == 1  # the champion, once
        assert client.get_model_version_by_alias("montage-segmentation", "champion").version == versions[0].version
        exp = client.get_experiment_by_name("montage-segmentation")
        trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("montage.sweep") == "grow"]
        tags = ("montage.trial_status", "montage.error")
        ended = [(r.info.run_name, r.info.status, *(r.data.tags.get(t) for t in tags)) for r in trials]
        assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials), ended  # the parent and 2 trials
        assert most() >= 1  # the autoscaler started worker nodes for the trials
        # the idle timeout is 6 s, but a node stays while anything asks for it: Ray Train asks the autoscaler
        # for each trial's workers and withdraws the request when the trial's controller shuts down; a trial
        # that ASHA stops is ended with its controller, and its request stands until it expires (180 s)
        started = time.time()
        wait_until(lambda: autoscaling.worker_nodes() == 0, IDLE_REMOVAL_S, "idle worker nodes to be removed")
        print(f"worker nodes removed {time.time() - started:.0f} s after the sweep")

    @pytest.mark.timeout(900)
    def test_a_training_grows_an_autoscaling_cluster_and_gets_a_replacement_for_its_lost_node(
        self, autoscaling, tracking, tmp_path
    ) -> None:
        """``montage submit train`` on the cluster the sweep left empty: the autoscaler launches a worker node
        for it. No spare node: that node dies (its raylet killed) after the first checkpoint, so the restart
        must wait for the autoscaler to launch a replacement; the training then finishes from that
        checkpoint, one FINISHED run with every epoch once."""
        import threading

        from cluster_helpers import kill_node, raylet_of_train_worker

        runs = tmp_path / "runs"
        train = ["train", "segmentation", "--config", "segmentation-smoke", "train.epochs=4", "train.max_steps=2",
                 "scaling.workers=1", "scaling.cpus_per_worker=1", "scaling.max_failures=1", f"run.storage={runs}",
                 "run.name=replaced"]  # fmt: skip
        wait_until(
            lambda: autoscaling.worker_nodes() == 0, IDLE_REMOVAL_S, "an empty cluster"
        )  # after the sweep's test
        out: dict = {}
        job = threading.Thread(target=lambda: out.update(rc=submit(autoscaling, tracking.uri, *train)))
        job.start()
        wait_until(lambda: any((runs / "replaced").glob("checkpoint_*")), 600, "the first checkpoint")

        raylet = wait_until(
            lambda: raylet_of_train_worker(autoscaling.gcs), 60, "the raylet of the training's worker node"
        )
        kill_node(raylet)
        job.join(timeout=780)
        assert out.get("rc") == 0
        client = mlflow.MlflowClient(tracking.uri)
        exp = client.get_experiment_by_name("montage-segmentation")
        (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'replaced'")
        assert run.info.status == "FINISHED"
        assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")) == [1, 2, 3, 4]
        assert int(run.data.tags["montage.starts"]) == 2  # the first start and the restart on the new node


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


@pytest.fixture(scope="module")
def s3():
    from cluster_helpers import S3Endpoint

    endpoint = S3Endpoint()
    yield endpoint
    endpoint.stop()


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


def test_a_sweep_on_object_storage_survives_a_lost_node(cluster, tracking, s3, monkeypatch) -> None:
    """A one-trial sweep (2 DDP workers, base.scaling.max_failures=1) whose trial, checkpoints and sweep
    state live on S3 (the nodes share no storage but the bucket): the node of a worker is removed after
    the first checkpoint; the trial's fit restarts once from that checkpoint on the spare node, its MLflow
    run gets epochs 1–4 each once, the sweep finishes, and the champion is registered from the bucket.
    (A plain fit takes the same path: a trial is a ``TorchTrainer`` fit with montage's failure config and
    resume; test_faults kills a worker of a plain fit on one node, the autoscaling test a fit's node.)"""
    import threading

    from montage.launch.tune import load_tune_config, run_sweep

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.uri)
    bucket = s3.bucket("lost-trial")
    tcfg, base, params = load_tune_config(
        ROOT / "tune_configs" / "segmentation-tiny.yaml",
        [*TINY, "base.train.epochs=4", "num_samples=1", "scheduler.name=none", "resources.workers=2",
         "base.scaling.max_failures=1", f"storage=s3://{bucket}/sweeps", f"storage_endpoint={s3.url}", "name=lost"],
    )  # fmt: skip
    out: dict = {}
    sweep = threading.Thread(target=lambda: out.update(result=run_sweep(tcfg, base, params)))
    started = time.time()
    sweep.start()
    wait_until(lambda: any("/checkpoint_" in k for k in s3.keys(bucket, "sweeps/lost/")), 300, "the first checkpoint")
    remove_train_node(cluster)
    sweep.join(timeout=600)
    result = out["result"]
    assert not result.errors, result.errors
    (trial,) = result.table
    assert trial.status == "finished" and trial.epochs == 4
    client = mlflow.MlflowClient(tracking.uri)
    assert sorted(int(m.step) for m in client.get_metric_history(trial.mlflow_run_id, "epoch")) == [1, 2, 3, 4]
    run = client.get_run(trial.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["montage.starts"] == "2"  # started, restarted once
    assert result.registered is not None
    assert client.get_model_version_by_alias("montage-segmentation", "champion").run_id == trial.mlflow_run_id
    print(f"lost node: sweep of one 4-epoch trial finished in {time.time() - started:.0f} s")
    add_worker_node(cluster)


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
