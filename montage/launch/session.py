"""The Ray session: connect to a cluster or start a private local Ray, and storage paths."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from montage.core.config import ConfigError


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
    """PIDs of the live Ray Train worker processes on this machine (Linux: their process title
    names the ``RayTrainWorker`` actor), for fault-injection tests and drills."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def autoscaling() -> bool:
    """Whether the connected cluster has an autoscaler that can add worker nodes (its config names a
    worker node type with ``max_workers`` > 0). A local ``ray.init()`` runs a monitor too, but with no
    autoscaling config."""
    config = autoscaler_config()
    if not config:
        return False
    head = config.get("head_node_type")
    types = config.get("available_node_types") or {}
    return any(int(spec.get("max_workers", 0) or 0) > 0 for name, spec in types.items() if name != head)


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
        grows = f"{nodes} nodes" if nodes > 1 else "an autoscaling cluster"
        raise ConfigError(
            f"tracking URI {uri} is a local file, but this Ray cluster has {grows}: workers on other nodes would "
            "each write their own database. Run an MLflow server on the head (`mlflow server --host <head-ip> "
            "--port 5000 ...`, as cluster.yaml does) and point runs at it: MLFLOW_TRACKING_URI=http://<head-ip>:5000 "
            "or `montage submit --tracking-uri http://<head-ip>:5000`"
        )


@dataclass
class Capacity:
    """What a cluster can grow to: the resources of every node it has or can have."""

    nodes: list[dict[str, float]]
    kind: str  # how the nodes were found, for messages ("type of the autoscaler", "of this cluster")
    labels: list[str] = field(default_factory=list)  # one line per node type (or node)
    known: bool = True  # False: an autoscaler whose node types this process cannot read

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> list[str]:
        return self.labels or [", ".join(f"{v:g} {k}" for k, v in sorted(n.items())) for n in self.nodes]


def cluster_capacity() -> Capacity:
    """The connected cluster's capacity once grown: read from its autoscaler's node types (the
    ``--autoscaling-config`` of the autoscaler serving this cluster, found on the head, or
    ``~/ray_bootstrap_config.yaml`` that ``ray up`` writes there), else the nodes that are up."""
    config = autoscaler_config()
    if config is not None:
        return _capacity_from_config(config)
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items() if k in ("CPU", "GPU")} for n in alive_nodes()]
    return Capacity(nodes, "of this cluster")


def _capacity_from_config(config: dict[str, Any]) -> Capacity:
    nodes, labels, known = [], [], True
    head = config.get("head_node_type")
    for name, spec in (config.get("available_node_types") or {}).items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items() if k in ("CPU", "GPU")}
        count = 1 if name == head else int(spec.get("max_workers", config.get("max_workers", 0)) or 0)
        if not spec.get("resources") and name != head:
            known = False  # a cloud provider fills these in from the instance type at run time
        nodes += [res] * count
        labels.append(f"{name}: {', '.join(f'{v:g} {k}' for k, v in sorted(res.items())) or 'none'} × {count}")
    return Capacity(nodes, "type of the autoscaler", labels, known)


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
