"""Cluster launcher configs validate against the schema that the installed Ray ships."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_config_validates_against_rays_schema(name: str) -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / name).read_text())
    jsonschema.validate(cfg, schema)
    assert any('pip install -q -e ".[dev]"' in c for c in cfg["setup_commands"])  # installed as the README says
    broken = {**cfg, "max_workerz": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# ------------------------------------------------------------- a sweep sized from the shipped cluster configs

EC2 = [  # what EC2's DescribeInstanceTypes says of cluster.yaml's instance types (the fields Ray reads)
    {"InstanceType": "m6i.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}, "MemoryInfo": {"SizeInMiB": 32768}},
    {"InstanceType": "g5.2xlarge", "VCpuInfo": {"DefaultVCpus": 8}, "MemoryInfo": {"SizeInMiB": 32768},
     "GpuInfo": {"Gpus": [{"Name": "A10G", "Manufacturer": "NVIDIA", "Count": 1}]}},
]  # fmt: skip


def prepared(name: str, monkeypatch: pytest.MonkeyPatch, ec2: bool = False) -> dict:
    """``name`` as the autoscaler on the head reads it: Ray's ``prepare_config`` (defaults, node types; the
    on-premise provider's single node type), and with ``ec2`` the resources that ``ray up`` fills in from
    EC2's instance types when it can ask the cloud (here its answer is given)."""
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load((ROOT / name).read_text()))
    if ec2:
        from ray.autoscaler._private.aws import node_provider

        monkeypatch.setattr(node_provider, "list_ec2_instances", lambda region, credentials=None: EC2)
        config = node_provider.AWSNodeProvider.fillout_available_node_types_resources(config)
    return config


@pytest.fixture
def fresh_cluster(monkeypatch):
    """``session.cluster_capacity()`` on a cluster just started from a given autoscaler config: only its
    head is up (``head_cpus`` CPUs)."""
    from montage.launch import session

    def capacity(config: dict, head_cpus: float):
        head = {"Alive": True, "Resources": {"CPU": head_cpus, "memory": 1e10, session.HEAD_RESOURCE: 1.0}}
        monkeypatch.setattr(session, "autoscaler_config", lambda: config)
        monkeypatch.setattr(session, "alive_nodes", lambda: [head])
        return session.cluster_capacity()

    return capacity


def _sweep(*overrides: str):
    from montage.launch.tune import load_tune_config

    return load_tune_config(ROOT / "tune_configs" / "segmentation.yaml", list(overrides))[0]


def test_a_sweep_on_the_shipped_clusters_is_sized_not_refused(fresh_cluster, monkeypatch, caplog) -> None:
    """cluster.yaml's GPU workers and cluster-onprem.yaml's machines declare no resources (Ray learns them
    when a node starts): the shipped sweep (2 workers × 4 CPUs + 1 GPU a trial) is not refused, and runs
    up to num_samples trials at once, saying why. Where ``ray up`` could ask EC2, the node types carry their
    resources: the sweep is sized from them, and a trial no node type can hold fails at once naming the GPU."""
    import logging

    from montage.core.config import ConfigError
    from montage.launch import session
    from montage.launch.tune import trial_concurrency

    sweep = _sweep()
    assert sweep.resources.gpus and sweep.num_samples == 32 and not sweep.max_concurrent
    aws = fresh_cluster(prepared("cluster.yaml", monkeypatch), head_cpus=0)
    assert not aws.known and aws.undeclared == ["gpu_worker × 8"]
    with caplog.at_level(logging.WARNING, logger="montage.launch.tune"):
        assert trial_concurrency(sweep, aws) == 32
        assert trial_concurrency(_sweep("max_concurrent=3"), aws) == 3
    assert "gpu_worker × 8" in caplog.text and "not declared" in caplog.text

    onprem = fresh_cluster(prepared("cluster-onprem.yaml", monkeypatch), head_cpus=16)
    assert onprem.undeclared == ["local.cluster.node × 2"]  # the head is up: its 16 CPUs are known
    assert onprem.nodes == [{"CPU": 16.0}]
    assert trial_concurrency(sweep, onprem) == 32
    assert session.autoscaling()  # the head's own node type has worker nodes: a local SQLite store is refused

    ec2 = fresh_cluster(prepared("cluster.yaml", monkeypatch, ec2=True), head_cpus=0)
    assert ec2.known and ec2.nodes == [{"CPU": 0.0}] + [{"CPU": 8.0, "GPU": 1.0}] * 8
    assert trial_concurrency(sweep, ec2) == 4  # 8 GPU nodes, 2 GPUs a trial
    with pytest.raises(ConfigError, match=r"no node type of the autoscaler can hold it .*gpu_worker.*not enough GPU"):
        trial_concurrency(_sweep("resources.gpus_per_worker=2"), ec2)


def test_a_local_tracking_store_is_refused_where_the_cluster_can_grow(fresh_cluster, monkeypatch, tmp_path) -> None:
    """One node up, but an autoscaler that can add more: a local store is refused as on several nodes (the
    4-node case runs on a real cluster in test_multinode); the head's server over HTTP, or a laptop's Ray
    with no autoscaler, is fine."""
    from montage.core.config import ConfigError
    from montage.launch import session
    from montage.launch.tune import load_tune_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = load_tune_config(ROOT / "tune_configs" / "segmentation-tiny.yaml")[1]  # tracking.uri: the default
    fresh_cluster(prepared("cluster.yaml", monkeypatch), head_cpus=0)
    with pytest.raises(ConfigError, match=r"sqlite:///\S+/mlruns\.db is a local file, but this Ray cluster can add "
                       r"nodes \(its autoscaler\).*mlflow server --host <head-ip>"):  # fmt: skip
        session.refuse_local_tracking_on_a_cluster(base)
    base.tracking.uri = "http://10.0.0.10:5000"
    session.refuse_local_tracking_on_a_cluster(base)
    base.tracking.uri = ""
    monkeypatch.setattr(session, "autoscaler_config", lambda: None)  # a laptop: one node, nothing to grow
    session.refuse_local_tracking_on_a_cluster(base)
