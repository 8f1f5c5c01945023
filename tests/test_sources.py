"""Model sources: one type, parsed once (no MLflow, no Ray; the registry kinds are resolved in
test_export, test_serve and test_rollout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from stores import mlflow_store

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
        ("exports/seg-openvino.xml", "openvino", {"path": "exports/seg-openvino.xml"}, None),
        ("s3://bucket/seg.xml", "openvino", {}, None),
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
    assert src.local == (kind == "checkpoint" or (kind in ("onnx", "openvino") and "://" not in text))


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
    with pytest.raises(FileNotFoundError, match="model source not found: .*gone.xml"):
        resolve_source(str(tmp_path / "gone.xml"))
    (tmp_path / "foreign.xml").write_text("<html/>")  # an .xml that is no OpenVINO IR
    from montage.platform.export import ExportError

    with pytest.raises(ExportError, match="foreign.xml is not an OpenVINO IR"):
        resolve_source(str(tmp_path / "foreign.xml"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"x")
    resolved = resolve_source(str(tmp_path / "ckpt"))  # a Ray checkpoint folder → its file
    assert resolved.checkpoint == tmp_path / "ckpt" / "checkpoint.pt" and resolved.runtime == "torch"
    assert resolved.pinned == resolved.source and resolved.label == str(tmp_path / "ckpt")


def test_a_remote_checkpoint_is_downloaded(tmp_path: Path, s3_endpoint) -> None:
    """``s3://`` sources (a local S3 endpoint): a checkpoint file, and a Ray checkpoint folder."""
    import boto3

    from montage.tracking.sources import resolve_source

    bucket = s3_endpoint.bucket("models")
    put = boto3.client("s3", endpoint_url=s3_endpoint.url, region_name="us-east-1").put_object
    put(Bucket=bucket, Key="runs/seg/best.pt", Body=b"weights")
    put(Bucket=bucket, Key="runs/seg/checkpoint_000002/checkpoint.pt", Body=b"folder weights")
    where = f"?endpoint_override={s3_endpoint.url.removeprefix('http://')}&scheme=http"
    file = resolve_source(f"s3://{bucket}/runs/seg/best.pt{where}")
    assert file.source.kind == "remote" and file.checkpoint.read_bytes() == b"weights"
    folder = resolve_source(f"s3://{bucket}/runs/seg/checkpoint_000002{where}")
    assert folder.checkpoint.name == "checkpoint.pt" and folder.checkpoint.read_bytes() == b"folder weights"
    with pytest.raises(FileNotFoundError, match="cannot download s3://models/runs/none.pt"):
        resolve_source(f"s3://{bucket}/runs/none.pt{where}")

    # resolved again (a Serve replica's reloads): the newest copy, and never more than two of one source
    put(Bucket=bucket, Key="runs/seg/best.pt", Body=b"new weights")
    again = [resolve_source(f"s3://{bucket}/runs/seg/best.pt{where}").checkpoint for _ in range(3)]
    assert again[-1].read_bytes() == b"new weights"
    assert len(list(again[-1].parent.parent.iterdir())) == 2 and not again[0].exists()
    # a process's downloads leave with it
    code = f"from montage.tracking.sources import resolve_source; print(resolve_source('s3://{bucket}/runs/seg/best.pt{where}').checkpoint)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    downloaded = Path(out.stdout.strip().splitlines()[-1])
    assert downloaded.name == "best.pt" and not downloaded.exists() and not downloaded.parents[2].exists()
    # while the source is gone, failed reloads keep the copy that serves
    boto3.client("s3", endpoint_url=s3_endpoint.url, region_name="us-east-1").delete_object(
        Bucket=bucket, Key="runs/seg/best.pt"
    )
    for _ in range(2):
        with pytest.raises(FileNotFoundError, match="cannot download"):
            resolve_source(f"s3://{bucket}/runs/seg/best.pt{where}")
    assert again[-1].read_bytes() == b"new weights"


def test_each_arm_runs_the_runtime_its_source_asks_for(tmp_path: Path) -> None:
    """A torch champion beside an ONNX challenger (a file, or a registry version tagged as an ONNX variant)
    gets each its own runtime unless the section names one; a remote challenger needs no local file."""
    import mlflow

    from montage.core import schema
    from montage.core.serve_sections import load_serve_config
    from montage.serve.graph import Arm, ReloadError, arm_of

    uri = mlflow_store(tmp_path, "reg.db")
    mlc = mlflow.MlflowClient(tracking_uri=uri)
    mlc.create_registered_model("m")
    mlc.create_model_version("m", source=str(tmp_path), tags={schema.RUNTIME: schema.RUNTIME_TORCH})  # v1
    mlc.create_model_version("m", source=str(tmp_path), tags={schema.RUNTIME: schema.RUNTIME_ONNX})  # v2
    mlc.create_model_version("m", source=str(tmp_path), tags={schema.RUNTIME: schema.RUNTIME_OPENVINO})  # v3
    champion = tmp_path / "best.pt"
    champion.write_bytes(b"x")

    def arms(*over: str) -> tuple[Arm | None, Arm | None]:
        cfg = load_serve_config(None, [f"segmentation.source={champion}", *over]).segmentation
        return arm_of(cfg, "segmentation", uri, "champion"), arm_of(cfg, "segmentation", uri, "challenger")

    champ, chall = arms("segmentation.challenger=models:/m/2")
    assert (champ.runtime, chall.runtime) == ("torch", "onnx") and chall.revision == "2"
    assert champ.revision == str(champion.stat().st_mtime_ns)
    assert arms("segmentation.challenger=exports/seg.onnx")[1].runtime == "onnx"  # not read to decide
    assert arms("segmentation.challenger=exports/seg.xml")[1].runtime == "openvino"
    assert arms("segmentation.challenger=models:/m/3")[1].runtime == "openvino"  # the version's runtime tag
    assert arms("segmentation.challenger=models:/m/1")[1].runtime == "torch"
    assert arms("segmentation.challenger=models:/m/2", "segmentation.challenger_runtime=openvino")[1].runtime == (
        "openvino"
    )
    champ, chall = arms("segmentation.runtime=onnx", "segmentation.challenger=models:/m/1")
    assert (champ.runtime, chall.runtime) == ("onnx", "torch")  # the section's runtime is the champion's only
    remote = arms("segmentation.challenger=s3://bucket/runs/seg/checkpoint_000002")[1]
    assert remote == Arm(ModelSource.parse("s3://bucket/runs/seg/checkpoint_000002"), "", "torch")
    mlc.set_registered_model_alias("m", "challenger", "2")
    assert arms("segmentation.challenger=models:/m@challenger")[1].revision == "2"
    assert arms("segmentation.challenger=models:/m@gone")[1] is None  # an alias that names nothing: no challenger
    with pytest.raises(ReloadError, match=r"segmentation \(challenger\): models:/m/9"):
        arms("segmentation.challenger=models:/m/9")
    from montage.core.config import ConfigError

    with pytest.raises(ConfigError, match="challenger_runtime: unknown 'tensorrt'"):
        arms("segmentation.challenger_runtime=tensorrt")


def test_a_series_names_a_file_source_by_its_file_name() -> None:
    from montage.serve.monitoring import version_tag

    assert version_tag({"source": "models:/m@champion", "revision": "4", "runtime": "onnx"}) == "v4-onnx"
    assert version_tag({"source": "/runs/h/checkpoint_000001", "revision": "1"}) == "checkpoint_000001"
    assert version_tag({"source": "/x/harm2.onnx", "runtime": "onnx"}) == "harm2.onnx-onnx"
    assert version_tag({"source": "s3://b/runs/best.pt?endpoint_override=h:9000", "runtime": "torch"}) == "best.pt"


@pytest.mark.parametrize("exported", ["net.onnx", "net.xml"])
def test_an_exported_network_is_no_teacher_or_init_checkpoint(exported: str, tiny_config) -> None:
    from montage.tracking.registry import resolve_model_sources

    for key in ("distill.teacher", "init.checkpoint"):
        cfg = tiny_config("segmentation", f"{key}={exported}")
        with pytest.raises(ValueError, match=f"{key} .*{exported}: an exported network .* no weights to train from"):
            resolve_model_sources(cfg)
