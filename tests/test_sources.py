"""Model sources: one type, parsed once (no MLflow, no Ray; the registry kinds are resolved in
test_export, test_serve and test_rollout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from montage.core.sources import ModelSource


@pytest.mark.parametrize(
    "text, kind, fields, uri",
    [
        ("models:/montage-segmentation@champion", "alias", {"name": "montage-segmentation", "alias": "champion"}, None),
        ("models:/montage-segmentation@challenger_2", "alias", {"alias": "challenger_2"}, None),
        ("models:/montage-harmonization/7", "version", {"name": "montage-harmonization", "version": "7"}, None),
        ("models:/m/007", "version", {"version": "7"}, "models:/m/7"),
        ("runs/seg/best.pt", "checkpoint", {"path": "runs/seg/best.pt"}, None),
        ("/abs/run/checkpoint_000003", "checkpoint", {"path": "/abs/run/checkpoint_000003"}, None),
        ("  runs/x.pt ", "checkpoint", {"path": "runs/x.pt"}, "runs/x.pt"),
        ("s3://bucket/runs/seg/checkpoint_000002", "remote", {"path": "s3://bucket/runs/seg/checkpoint_000002"}, None),
        ("gs://b/c.pt?endpoint_override=localhost:9000", "remote", {}, None),
        ("exports/seg.onnx", "onnx", {"path": "exports/seg.onnx"}, None),
        ("s3://bucket/seg.ONNX", "onnx", {"path": "s3://bucket/seg.ONNX"}, None),
    ],
)
def test_every_kind_parses_and_prints_back(text: str, kind: str, fields: dict, uri: str | None) -> None:
    src = ModelSource.parse(text)
    assert src.kind == kind
    assert all(getattr(src, k) == v for k, v in fields.items())
    assert src.uri == (uri or text) and str(src) == src.uri
    assert ModelSource.parse(src.uri) == src  # printing and parsing again changes nothing
    assert ModelSource.parse(src) is src  # a parsed source passes through
    assert src.in_registry == (kind in ("alias", "version"))
    assert src.local == (kind == "checkpoint" or (kind == "onnx" and "://" not in text))


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("models:/montage-segmentation", "names no alias or version"),
        ("models:/montage-segmentation/", "names no alias or version"),
        ("models:/montage-segmentation/latest", "names no alias or version"),
        ("models:/montage-segmentation@", "expected models:/<name>@<alias>"),
        ("models:/@champion", "expected models:/<name>@<alias>"),
        ("models:/a@b@c", "expected models:/<name>@<alias>"),
        ("models:/a@x/y", "expected models:/<name>@<alias>"),
        ("models:montage-segmentation@champion", "a registry source is"),
        ("://nowhere", "not a URI"),
    ],
)
def test_a_bad_source_is_refused_naming_it(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as err:
        ModelSource.parse(text, "segmentation.challenger")
    assert "segmentation.challenger" in str(err.value)
    if text.strip():
        assert repr(text) in str(err.value) or repr(text.strip()) in str(err.value)


def test_not_a_string_and_inconsistent_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="expected a string, got int 7"):
        ModelSource.parse(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind 'file'"):
        ModelSource("file", path="x.pt")
    with pytest.raises(ValueError, match="needs a name only"):
        ModelSource("alias", name="m", alias="a", path="x.pt")
    with pytest.raises(ValueError):
        ModelSource("version", name="m", alias="a")


def test_champion_and_versions_are_built_not_formatted() -> None:
    champ = ModelSource.champion("segmentation")
    assert champ.uri == "models:/montage-segmentation@champion" and champ.kind == "alias"
    assert champ.at_version(3) == ModelSource.parse("models:/montage-segmentation/3")
    assert ModelSource.registered("m", alias="challenger").uri == "models:/m@challenger"
    with pytest.raises(ValueError, match="an alias or a version"):
        ModelSource.registered("m", alias="a", version=2)
    with pytest.raises(ValueError, match="not a registry source"):
        ModelSource.parse("runs/best.pt").at_version(2)


def test_serve_config_refuses_a_bad_source_naming_the_key() -> None:
    from montage.core.config import ConfigError
    from montage.core.serve_sections import load_serve_config

    cfg = load_serve_config(None, ["segmentation.challenger=s3://b/seg.pt"])
    assert cfg.segmentation.arm_source("segmentation") == ModelSource.champion("segmentation")
    assert cfg.segmentation.arm_source("segmentation", "challenger").kind == "remote"
    assert cfg.harmonization.arm_source("harmonization", "challenger") is None
    with pytest.raises(ConfigError, match=r"segmentation: challenger 'models:/x' names no alias or version"):
        load_serve_config(None, ["segmentation.challenger=models:/x"])
    with pytest.raises(ConfigError, match=r"harmonization: source is empty|harmonization: source 'models:/h@'"):
        load_serve_config(None, ["harmonization.source=models:/h@"])


def test_local_sources_resolve_or_say_what_is_missing(tmp_path: Path) -> None:
    from montage.platform.checkpoint import CheckpointError
    from montage.tracking.sources import resolve_source

    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        resolve_source(ModelSource.parse(str(tmp_path / "missing.pt")))
    with pytest.raises(FileNotFoundError, match="model source not found: .*gone.onnx"):
        resolve_source(str(tmp_path / "gone.onnx"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"x")
    resolved = resolve_source(str(tmp_path / "ckpt"))  # a Ray checkpoint folder → its file
    assert resolved.checkpoint == tmp_path / "ckpt" / "checkpoint.pt" and resolved.runtime == "torch"
    assert resolved.pinned == resolved.source and resolved.label == str(tmp_path / "ckpt")
