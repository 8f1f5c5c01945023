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
