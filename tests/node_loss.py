"""Losing nodes on purpose, for tests/test_multinode.py and bench/cluster_bench.py: a
``ray.cluster_utils.Cluster`` whose worker nodes a caller removes without warning (the node of a Ray
Train worker, or of a Serve replica), and steady HTTP traffic that records what the loss cost."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import requests
from cluster_helpers import api_server_env, free_port, wait_until

# a dead node is noticed within ~2 s (Ray's defaults take 30 s)
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "health_check_initial_delay_ms": 0,
}


def lost_node_cluster(nodes: int = 3, **init):
    """A ``ray.cluster_utils.Cluster``: a head with 0 CPUs (this process is its driver, connected with
    ``ray.init(**init)``) and ``nodes`` 1-CPU worker nodes on this machine's disk. Stop it with
    ``ray.shutdown()``, then ``.shutdown()``."""
    import ray
    from ray.cluster_utils import Cluster

    # free ports, not Ray's fixed defaults (8265, 52365): another Ray on the machine may hold them, and a head
    # whose dashboard cannot bind its port runs without one (no State API, no Ray Train clean-up)
    # and every node's processes are told the head's dashboard: Ray Train's placement-group cleaner asks the
    # State API without an address, which fails with another Ray on the machine (see tests/conftest.py)
    dashboard_port = free_port()
    head = {
        "num_cpus": 0,
        "dashboard_port": dashboard_port,
        "dashboard_agent_listen_port": free_port(),
        "env_vars": api_server_env(f"127.0.0.1:{dashboard_port}"),
        "_system_config": FAST_HEALTH_CHECKS,
        "include_log_monitor": False,  # as the other test heads (cluster_helpers.NO_LOG_MONITOR)
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=cluster.address, **init)
    for _ in range(nodes):
        add_worker_node(cluster)
    cluster.wait_for_nodes()
    return cluster


def add_worker_node(cluster) -> None:
    """One more 1-CPU worker node: the spare a lost node used up, or the replacement a cluster brings."""
    cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port(), env_vars=api_server_env(cluster.webui_url))


def node_of_actor(cluster, class_name: str):
    """The node of ``cluster`` that runs a live actor whose class name contains ``class_name`` (a Ray
    Train worker, a Serve replica: ranks are not visible from outside, any of them), None when none runs.
    Asks Ray's State API at the cluster's own address: without one it picks the newest Ray on the machine."""
    from ray.util.state import list_actors

    alive = list_actors(cluster.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    node_id = next((a.node_id for a in alive if class_name in (a.class_name or "")), None)
    return next((n for n in cluster.list_all_nodes() if n.node_id == node_id), None)


def node_of_train_worker(cluster):
    """The node of ``cluster`` that runs a live Ray Train worker; None when none runs."""
    return node_of_actor(cluster, "RayTrainWorker")


def remove_train_node(cluster, timeout: float = 60) -> float:
    """Remove the node of a Ray Train worker without warning (waiting up to ``timeout`` for one to
    run); returns when it was removed (``time.time()``)."""
    node = wait_until(lambda: node_of_train_worker(cluster), timeout, "a node running a Ray Train worker", every=0.05)
    removed = time.time()
    cluster.remove_node(node, allow_graceful=False)
    return removed


def serve_segmentation(checkpoint: str, port: int) -> str:
    """The Serve application with two segmentation replicas (0.5 CPU each) and its ingress (0.25 CPU),
    nothing else: on a head of 0 CPUs they all run on worker nodes. Returns its /v1/segment URL."""
    from montage.serve.app import load_serve_config, run

    run(load_serve_config(None, [
        f"port={port}", f"segmentation.source={checkpoint}", "segmentation.num_replicas=2", "segmentation.num_cpus=0.5",
        "harmonization.enabled=false", "ingress_cpus=0.25", "monitoring.enabled=false",
    ]))  # fmt: skip
    return f"http://127.0.0.1:{port}/v1/segment"


def node_of_replica(cluster, deployment_class: str = "Segmenter"):
    """The node of ``cluster`` that runs a live replica of the deployment of that class."""
    node = node_of_actor(cluster, deployment_class)
    assert node is not None, f"no live replica of {deployment_class} on the cluster"
    return node


@dataclass
class Call:
    sent: float  # time.time()
    answered: float
    status: int  # HTTP status; 0: no answer (refused, reset, timed out)


@dataclass
class Outage:
    """What losing a node at ``removed`` cost a stream of requests."""

    removed: float
    before: list[Call]  # answered before the removal
    after: list[Call]  # answered from the removal on
    in_flight: int  # of ``after``: sent before the removal
    failed: list[Call]  # of ``after``: not answered 200
    back_s: float  # the removal → the first 200 answered after the last failure (after the removal if none failed)
    longest_gap_s: float  # the longest time without a 200, from the removal on


class Traffic:
    """``with Traffic(url, image, clients) as traffic:`` — ``clients`` threads each post ``image``, one
    request at a time with ``pause`` between, until the block ends; ``traffic.calls`` holds each request."""

    def __init__(self, url: str, image: bytes, clients: int = 1, pause: float = 0.05, timeout: float = 30) -> None:
        self.url, self.image, self.pause, self.timeout = url, image, pause, timeout
        self.clients = clients
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(clients)]

    def _send(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            try:
                status = requests.post(self.url, files={"image": self.image}, timeout=self.timeout).status_code
            except requests.RequestException:
                status = 0
            self.calls.append(Call(sent, time.time(), status))
            self._stop.wait(self.pause)

    def wait_answered(self, after: float, timeout: float) -> None:
        """Wait until a request is answered 200 after ``after`` (``time.time()``)."""
        wait_until(lambda: any(c.answered > after and c.status == 200 for c in list(self.calls)), timeout,
                   "the service to answer again", every=0.1)  # fmt: skip

    def outage(self, removed: float) -> Outage:
        calls = sorted(self.calls, key=lambda c: c.answered)
        after = [c for c in calls if c.answered >= removed]
        failed = [c for c in after if c.status != 200]
        last_failure = max((c.answered for c in failed), default=removed)
        back = min((c.answered for c in after if c.status == 200 and c.answered > last_failure), default=float("nan"))
        ok = [removed, *(c.answered for c in after if c.status == 200)]
        gaps = [b - a for a, b in zip(ok, ok[1:], strict=False)]
        return Outage(
            removed=removed,
            before=[c for c in calls if c.answered < removed],
            after=after,
            in_flight=sum(c.sent < removed for c in after),
            failed=failed,
            back_s=back - removed,
            longest_gap_s=max(gaps, default=float("nan")),
        )

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)
