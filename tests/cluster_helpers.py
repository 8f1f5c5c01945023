"""Real servers for the multi-node tests and bench/cluster_bench.py: an MLflow tracking server over
HTTP, a local S3 endpoint (moto), and an autoscaling Ray head on Ray's fake multi-node provider. Each
stops only what it started (never `ray stop`, which would end every Ray on the machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from stores import mlflow_store

BIN = Path(sys.executable).parent
# the environment of a test head started with `ray start --head --block`: no uv runtime env, and no drain
# on SIGTERM (the head's processes get it together when the test stops it, and Ray's 30 s drain of the
# node would wait for a GCS that is already gone)
HEAD_ENV = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# the heads' log monitors would forward the workers' output to drivers that print none of it, rescanning the
# growing log folder ten times a second (seconds of CPU a minute)
NO_LOG_MONITOR = ["--include-log-monitor=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_server_env(dashboard: str) -> dict[str, str]:
    """The environment that points a Ray node's processes at their own cluster's dashboard (``host:port`` or a
    URL): Ray Train's placement-group cleaner asks the State API without an address, which with another Ray
    on the machine fails ("Found multiple active Ray instances") unless this names the dashboard to ask."""
    return {"RAY_API_SERVER_ADDRESS": dashboard if "://" in dashboard else f"http://{dashboard}"}


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def live_placement_groups() -> list[str] | None:
    """The placement groups of the connected Ray that are not removed (created or still pending), as
    ``<id> <bundles>``; None when this process is not connected to a Ray."""
    import ray

    if not ray.is_initialized():
        return None
    table = ray.util.placement_group_table()
    return [f"{pg_id[:12]} {pg['bundles']}" for pg_id, pg in table.items() if pg["state"] != "REMOVED"]


def wait_placement_groups_removed(timeout: float, after: str) -> None:
    """Wait until every placement group of the connected Ray is removed; raise naming those left."""
    try:
        wait_until(lambda: not live_placement_groups(), timeout, f"the placement groups of {after} to go")
    except TimeoutError:
        left = live_placement_groups()
        raise AssertionError(f"{len(left)} placement groups outlived {after} by {timeout:.0f} s: {left}") from None


class MlflowServer:
    """``mlflow server`` on a loopback port with its own SQLite store and artifact root; ``stop`` and
    ``start`` again keep the same port, store and artifacts (the head's server going away)."""

    def __init__(self, root: Path, artifacts: str = "", env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = artifacts or (root / "artifacts").as_uri()
        # no job execution: montage runs no MLflow jobs, and the server would start six huey consumers that
        # poll all the time (~8 % of a core) and leave a folder in /dev/shm each
        self.env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> MlflowServer:
        mlflow_store(self.root, "mlflow.db")  # a new store is a copy of the process's template (no migrations)
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts, "--workers", "1"]  # fmt: skip
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                return requests.get(f"{self.uri}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, timeout, "the MLflow server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # its workers can take their time: the server is gone either way
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


class S3Endpoint:
    """moto's S3 server (the S3 HTTP protocol) on a loopback port, in this process."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its server logs every request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")  # fmt: skip

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, bucket: str, key: str) -> bytes | None:
        """The object's content, None when there is none."""
        client = self.client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def stop(self) -> None:
        self.server.stop()


class AutoscalingHead:
    """A Ray head whose autoscaler runs Ray's fake multi-node provider: worker nodes of the given
    types are started (as raylets on this machine) on demand and removed after the idle timeout.
    The cluster config is written here because the wheel does not ship the provider's example."""

    def __init__(self, root: Path, worker_types: dict, head_cpus: float = 0, idle_timeout_s: float = 6) -> None:
        import ray._private.services

        self.root = root
        self.ip = ray._private.services.get_node_ip_address()
        self.port, self.dashboard_port = free_port(), free_port()
        self.gcs = f"{self.ip}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.config = {
            "cluster_name": "montage-test",
            "max_workers": sum(t["max_workers"] for t in worker_types.values()),
            "upscaling_speed": 10,
            "idle_timeout_minutes": idle_timeout_s / 60,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.gcs},  # fmt: skip
            "auth": {},
            "docker": {},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
                **{name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in worker_types.items()},
            },
            "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None, timeout: float = 120) -> AutoscalingHead:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "autoscaling.yaml"
        path.write_text(json.dumps(self.config))
        # every node's processes are told the head's dashboard (api_server_env)
        full = {**os.environ, **HEAD_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                **api_server_env(self.dashboard), **(env or {})}  # fmt: skip
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", f"--node-ip-address={self.ip}",
               f"--num-cpus={self.config['available_node_types']['ray.head.default']['resources']['CPU']:g}",
               f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--autoscaling-config={path}", "--disable-usage-stats", *NO_LOG_MONITOR]  # fmt: skip
        log = open(self.root / "head.log", "a")
        self.proc = subprocess.Popen(cmd, env=full, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        from ray.job_submission import JobSubmissionClient

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited: {(self.root / 'head.log').read_text()[-2000:]}")
            try:
                JobSubmissionClient(self.dashboard).list_jobs()
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_until(up, timeout, "the autoscaling Ray head", every=1)
        return self

    def worker_node_ids(self) -> set[str]:
        """The IDs of the alive nodes other than the head, as the dashboard's state API reports them."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return {n.node_id for n in nodes if not n.is_head_node}

    def worker_nodes(self) -> int:
        """How many nodes other than the head are alive."""
        return len(self.worker_node_ids())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        kill_cluster_processes(self.gcs)
        forget_head(self.port)


def forget_head(port: int) -> None:
    """Remove the address a `ray start` head on ``port`` left behind (Ray's ``ray_current_cluster`` in its
    temp folder, the run's own: conftest), so nothing later in the run tries to join that stopped head."""
    record = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    if record.is_file() and str(port) in record.read_text():
        record.unlink()


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (Linux /proc), -1 when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def raylet_of(pid: int, gcs_address: str) -> int | None:
    """The raylet of the cluster at ``gcs_address`` that ``pid`` (a Ray worker) runs under, walking up
    its parents; None when it is no worker of that cluster (other Rays may share this machine)."""
    while pid > 1:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        parent = parent_pid(pid)
        if "raylet" in cmdline.split("\0", 1)[0] and gcs_address in cmdline:
            return pid
        pid = parent
    return None


def kill_node(raylet: int) -> None:
    """A node dies: SIGKILL its raylet and every process under it (its workers), as a lost machine would."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(parent_pid(int(entry.name)), []).append(int(entry.name))
    tree, todo = [], [raylet]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_cluster_processes(gcs_address: str) -> None:
    """Every process of the cluster at ``gcs_address`` on this machine (fake worker nodes the
    autoscaler started outlive the head's `ray start`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if gcs_address in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def train_worker_processes() -> list[int]:
    """PIDs of every Ray Train worker process on this machine, of any cluster (Linux: their process
    title names the ``RayTrainWorker`` actor); callers keep those of their cluster by its raylets."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def raylet_of_train_worker(gcs_address: str) -> int | None:
    """The raylet of a node of the cluster at ``gcs_address`` that runs a live Ray Train worker."""
    return next((r for pid in train_worker_processes() if (r := raylet_of(pid, gcs_address))), None)


def submit(head: AutoscalingHead, tracking_uri: str, *command: str) -> int:
    """``montage submit`` as on a cluster whose nodes have montage installed (no working dir upload:
    the fake nodes share this machine's session folder, and one node's runtime-env agent would delete
    the unpacked working dir another node's workers run in)."""
    from montage.cli import main

    return main([*["submit", *command], "--address", head.dashboard, "--tracking-uri", tracking_uri,
                 "--python", sys.executable, "--working-dir", ""])  # fmt: skip
