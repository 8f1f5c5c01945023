"""The Ray session: connect to a cluster or start a private local Ray; storage paths; what the cluster
holds and can grow to (its nodes, the autoscaler's node types, :class:`Capacity`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from montage.core.config import ConfigError

HEAD_RESOURCE = "node:__internal_head__"  # the resource only the head node of a Ray cluster has


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS (``auto``: a ``ray start`` cluster on this machine),
    or else start a private local Ray, once per process. Never guesses: a stale
    ``ray start`` record on this machine must not make a laptop run wait on a dead head."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(
        address=address or os.environ.get("RAY_ADDRESS") or "local",
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def storage_path(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).resolve())


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes of the connected cluster (Ray's State API, which
    the cluster's dashboard serves), for fault-injection tests and drills. Only this cluster's: other
    Rays on the same machine (a test cluster, a second session) keep theirs."""
    import ray
    from ray.util.state import list_actors

    # the connected cluster's address: without one, the State API asks the newest Ray on the machine
    alive = list_actors(
        ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    return sorted(actor.pid for actor in alive if actor.pid)


def autoscaling() -> bool:
    """Whether the connected cluster has an autoscaler that can add worker nodes (its config names a
    node type of which it may start worker nodes). A local ``ray.init()`` runs a monitor too, but with no
    autoscaling config."""
    config = autoscaler_config()
    return bool(config) and any(t.workers > 0 for t in node_types(config))


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def refuse_local_tracking_on_a_cluster(cfg: Any) -> None:
    """A local MLflow store (``sqlite:///mlruns.db``, a folder) is a file on ONE machine: on a cluster
    of several nodes (or one that can grow) each node's workers would open their own copy. Refuse it
    before any worker starts and say what to use instead."""
    from montage.tracking.runs import is_local_store, resolve_tracking_uri

    if not cfg.tracking.enabled:
        return
    uri = resolve_tracking_uri(cfg.tracking.uri)
    if not is_local_store(uri):
        return
    nodes = len(alive_nodes())
    if nodes > 1 or autoscaling():
        grows = f"has {nodes} nodes" if nodes > 1 else "can add nodes (its autoscaler)"
        raise ConfigError(
            f"tracking URI {uri} is a local file, but this Ray cluster {grows}: workers on other nodes would "
            "each write their own database. Run an MLflow server on the head (`mlflow server --host <head-ip> "
            "--port 5000 ...`, as cluster.yaml does) and point runs at it: MLFLOW_TRACKING_URI=http://<head-ip>:5000 "
            "or `montage submit --tracking-uri http://<head-ip>:5000`"
        )


@dataclass
class Capacity:
    """What a cluster can grow to: the resources of every node it has or can have."""

    nodes: list[dict[str, float]]  # one entry per node whose resources are known
    kind: str  # how the nodes were found, for messages ("type of the autoscaler", "of this cluster")
    labels: list[str] = field(default_factory=list)  # one line per node type (or node)
    # node types (``name × count``) whose resources are not declared in the autoscaler's config: the
    # provider learns them when a node starts, so what they can hold is unknown here
    undeclared: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        """Whether every node the cluster can have is in :attr:`nodes`."""
        return not self.undeclared

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> list[str]:
        return self.labels or [_fmt(n) for n in self.nodes]


@dataclass(frozen=True)
class NodeType:
    """A node type of an autoscaler's config, as Ray's autoscaler reads it."""

    name: str
    resources: dict[str, float] | None  # None: not declared (``resources: {}`` or none)
    head: bool  # the head's type: one node of it is the head
    workers: int  # how many worker nodes of it the autoscaler may start

    @property
    def count(self) -> int:
        return int(self.head) + self.workers


def node_types(config: dict[str, Any]) -> list[NodeType]:
    """The node types of an autoscaling config, counted as Ray's autoscaler counts them: the head's type
    gives the head plus its own ``max_workers`` (default 0; Ray's on-premise provider has one type for the
    head and the workers), any other type ``max_workers`` worker nodes (default: the cluster's)."""
    head = config.get("head_node_type")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        spec = spec or {}
        default = 0 if name == head else config.get("max_workers", 0)
        declared = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        out.append(NodeType(name, declared or None, name == head, int(spec.get("max_workers", default) or 0)))
    return out


def cluster_capacity() -> Capacity:
    """The connected cluster's capacity once grown: read from its autoscaler's node types (the
    ``--autoscaling-config`` of the autoscaler serving this cluster, found on the head, or
    ``~/ray_bootstrap_config.yaml`` that ``ray up`` writes there), else the nodes that are up."""
    config = autoscaler_config()
    if config is not None:
        return _capacity_from_config(config)
    nodes = [_schedulable(n) for n in alive_nodes()]
    return Capacity(nodes, "of this cluster")


def _schedulable(node: dict) -> dict[str, float]:
    return {k: float(v) for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU")}


def _capacity_from_config(config: dict[str, Any]) -> Capacity:
    """A node type without declared resources is one whose nodes Ray sizes when they start (``resources: {}``:
    the CPUs and GPUs Ray detects; a cloud provider may fill them in from the instance type when ``ray up``
    can ask the cloud, Ray's on-premise provider never does). Its head is up: its resources are read there;
    its worker nodes stay unknown (:attr:`Capacity.undeclared`)."""
    nodes, labels, undeclared = [], [], []
    for t in node_types(config):
        if t.resources is not None:
            res = {k: v for k, v in t.resources.items() if k in ("CPU", "GPU")}
            nodes += [res] * t.count
            text = _fmt(res)
        else:
            up = [_schedulable(n) for n in alive_nodes() if HEAD_RESOURCE in n.get("Resources", {})] if t.head else []
            nodes += up[:1]
            if t.workers:
                undeclared.append(f"{t.name} × {t.workers}")
            text = "not declared" + (f" (the head: {_fmt(up[0])})" if up else "")
        labels.append(f"{t.name}: {text} × {t.count}")
    return Capacity(nodes, "type of the autoscaler", labels, undeclared)


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items())) or "none"


def autoscaler_config() -> dict[str, Any] | None:
    """The autoscaling config of the cluster this process is connected to, when it can be read here."""
    import ray
    import yaml

    gcs = ray.get_runtime_context().gcs_address
    for path in _monitor_configs(gcs) + [Path("~/ray_bootstrap_config.yaml").expanduser()]:
        if path.is_file():
            try:
                return yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError):
                continue
    return None


def _monitor_configs(gcs_address: str) -> list[Path]:
    """The ``--autoscaling-config`` files of the autoscaler monitors of ``gcs_address`` on this machine."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") for a in args) or f"--gcs-address={gcs_address}" not in args:
            continue
        found += [Path(a.split("=", 1)[1]) for a in args if a.startswith("--autoscaling-config=")]
    return found
