"""A :class:`~montage.core.sources.ModelSource` resolved to files on this machine: registry
aliases and versions through MLflow (an ONNX variant: its ``.onnx`` and the checkpoint it was
exported from; an OpenVINO variant: its IR ``.xml`` + ``.bin`` and that checkpoint), remote
checkpoints through pyarrow's filesystems (what Ray Train persists with), ONNX and IR files through
the parent they name in their metadata. The one ``resolve_source`` of montage:
Serve, ``montage evaluate``, ``export``, ``optimize`` and the training launchers use it.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from montage.core import schema
from montage.core.sources import ModelSource, logged_model_uri
from montage.tracking.runs import client, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    """A source and the local files that serve it."""

    source: ModelSource  # as given
    pinned: ModelSource  # an alias: the version it names now; every other kind: the source
    checkpoint: Path  # the checkpoint file (an exported source: the one it was made from: it holds the config)
    onnx: Path | None = None  # the exported network that replaces the checkpoint's, for an ONNX source
    label: str = ""  # what /healthz and the logs call it
    ir: Path | None = None  # the OpenVINO IR (.xml) that replaces the checkpoint's network, for an OpenVINO source

    @property
    def runtime(self) -> str:
        """``openvino`` for an IR file or registered OpenVINO variant, ``onnx`` for an ONNX file or
        registered ONNX variant, else ``torch``."""
        return "openvino" if self.ir is not None else "onnx" if self.onnx is not None else "torch"

    @property
    def exported(self) -> Path | None:
        """The exported network (ONNX or IR) that replaces the checkpoint's, None for a checkpoint."""
        return self.ir or self.onnx


def model_version(source: ModelSource, tracking_uri: str = "") -> Any:
    """The registry ``ModelVersion`` a registry source names now (raises MLflow's error when none)."""
    if not source.in_registry:
        raise ValueError(f"{source} is not a registry source")
    mlc = client(tracking_uri)
    if source.kind == "alias":
        return mlc.get_model_version_by_alias(source.name, source.alias)
    return mlc.get_model_version(source.name, source.version)


def is_onnx_variant(version: Any) -> bool:
    return version.tags.get(schema.RUNTIME) == schema.RUNTIME_ONNX


def is_openvino_variant(version: Any) -> bool:
    return version.tags.get(schema.RUNTIME) == schema.RUNTIME_OPENVINO


def source_runtime(source: ModelSource, tracking_uri: str = "", version: Any = None) -> str:
    """The runtime a source's own kind asks for, without downloading it: ``onnx`` for an ONNX file
    or a registry version tagged as an ONNX variant, ``openvino`` for an IR file or a version tagged
    as an OpenVINO variant, else ``torch``."""
    if source.kind in ("onnx", "openvino"):
        return source.kind
    if source.in_registry:
        version = version or model_version(source, tracking_uri)
        return "onnx" if is_onnx_variant(version) else "openvino" if is_openvino_variant(version) else "torch"
    return "torch"


def local_checkpoint(path: str) -> Path:
    """A checkpoint file on this machine (a folder's ``checkpoint.pt``); a remote one (``s3://``, ``gs://``,
    …) is downloaded first."""
    from montage.platform.checkpoint import resolve_checkpoint_path

    if ModelSource.parse(path).local:
        return resolve_checkpoint_path(path)
    return resolve_checkpoint_path(_download(path))


_downloads: Path | None = None  # this process's download folder, removed when it exits


def _download_folder(uri: str) -> Path:
    """A new, empty folder for a download of ``uri``, in this process's own download folder (removed when
    the process exits). Each download of a URI gets its own folder (a source resolved again, as a Serve
    replica's reload does, may have changed), and only the newest two of a URI are kept: the one being
    made and the one that may still serve until it replaces it. Copies never pile up in a long-lived
    process."""
    global _downloads
    if _downloads is None or not _downloads.is_dir():
        _downloads = Path(tempfile.mkdtemp(prefix="montage-download-"))
        atexit.register(shutil.rmtree, _downloads, True)
    key = _downloads / hashlib.sha256(uri.encode()).hexdigest()[:16]
    key.mkdir(exist_ok=True)
    copies = sorted((int(p.name) for p in key.iterdir() if p.name.isdigit()), reverse=True)
    for old in copies[1:]:
        shutil.rmtree(key / str(old), ignore_errors=True)
    folder = key / str((copies[0] + 1) if copies else 0)
    folder.mkdir()
    return folder


def _download(uri: str, into: Path | None = None) -> Path:
    import pyarrow.fs

    local = into or _download_folder(uri)
    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
        if fs.get_file_info(inner).type == pyarrow.fs.FileType.File:
            target = local / Path(inner).name
            pyarrow.fs.copy_files(uri, str(target))
            return target
        pyarrow.fs.copy_files(uri, str(local))
    except (OSError, ValueError) as exc:
        if into is None:  # a failed download leaves no copy that would count as the newest
            shutil.rmtree(local, ignore_errors=True)
        raise FileNotFoundError(f"cannot download {uri}: {exc}") from exc
    return local


def resolve_source(source: ModelSource | str, tracking_uri: str = "") -> ResolvedSource:
    """The local files of ``source`` (a string is parsed first). Raises ``CheckpointError`` for a
    checkpoint that does not exist, ``FileNotFoundError`` for a missing ONNX file or a version without
    its artifact, MLflow's error for a name, alias or version the registry does not hold."""
    src = ModelSource.parse(source)
    if src.in_registry:
        return _resolve_registered(src, tracking_uri)
    if src.kind == "onnx":
        onnx_path, checkpoint, parent = _exported_file(src, _download, onnx_parent, tracking_uri)
        return ResolvedSource(src, src, checkpoint, onnx_path, f"{src.path} (onnx of {parent})")
    if src.kind == "openvino":
        xml, checkpoint, parent = _exported_file(src, _download_ir, ir_parent, tracking_uri)
        return ResolvedSource(src, src, checkpoint, label=f"{src.path} (openvino of {parent})", ir=xml)
    return ResolvedSource(src, src, local_checkpoint(src.path), label=src.path)


def _exported_file(
    src: ModelSource, fetch: Callable[[str], Path], parent_of: Callable[[Path], ModelSource], tracking_uri: str
) -> tuple[Path, Path, ModelSource]:
    """An exported network named by path (fetched first when remote), its parent's checkpoint (read from
    the file's own metadata by ``parent_of``) and that parent."""
    path = Path(src.path) if src.local else fetch(src.path)
    if not path.is_file():
        raise FileNotFoundError(f"model source not found: {src.path}")
    parent = parent_of(path)
    return path, resolve_source(parent, tracking_uri).checkpoint, parent


def _download_ir(uri: str) -> Path:
    """A remote IR: its ``.xml`` and the ``.bin`` beside it, into one local folder."""
    xml = _download(uri)
    _download(uri[: -len(".xml")] + ".bin", xml.parent)
    return xml


def onnx_parent(onnx_path: Path) -> ModelSource:
    """The source an exported ONNX file was made from (``montage.parent`` in its metadata)."""
    from montage.platform.export import read_metadata

    parent = read_metadata(onnx_path).get(schema.PARENT, "")
    if not parent:
        raise ValueError(
            f"{onnx_path} does not name the checkpoint it was exported from (ONNX metadata {schema.PARENT}): export "
            "it with `montage export`, or serve its registered variant (models:/<name>/<version>)"
        )
    return ModelSource.parse(parent, f"{onnx_path}'s {schema.PARENT}")


def ir_parent(xml: Path) -> ModelSource:
    """The source an OpenVINO IR was made from (``montage.parent`` in its ``rt_info``)."""
    from montage.platform.ov_runtime import read_ir_metadata

    parent = read_ir_metadata(xml, schema.PARENT)
    if not parent:
        raise ValueError(
            f"{xml} does not name the checkpoint it was made from (rt_info {schema.PARENT}): make it with "
            "`montage optimize <task> --method openvino`, or serve its registered variant (models:/<name>/<version>)"
        )
    return ModelSource.parse(parent, f"{xml}'s {schema.PARENT}")


def _exported_network(
    src: ModelSource, mv: Any, pinned: ModelSource, files: Path, pattern: str, what: str, tracking_uri: str
) -> tuple[Path, Path, ModelSource]:
    """An exported variant's network file among its ``files``, its parent's checkpoint (from the
    version's parent tag) and that parent."""
    found = sorted(files.rglob(pattern))
    if not found:
        raise FileNotFoundError(f"{src} (version {mv.version}) holds no {what}")
    parent = ModelSource.parse(mv.tags.get(schema.PARENT, ""), f"{pinned}'s {schema.PARENT} tag")
    return found[0], resolve_source(parent, tracking_uri).checkpoint, parent


def _resolve_registered(src: ModelSource, tracking_uri: str) -> ResolvedSource:
    mv = model_version(src, tracking_uri)
    pinned = src.at_version(mv.version)
    files = _download_version(mv, tracking_uri)
    if is_onnx_variant(mv):
        network, checkpoint, parent = _exported_network(src, mv, pinned, files, "*.onnx", ".onnx file", tracking_uri)
        label = f"{src.name} v{mv.version} ({mv.tags.get(schema.VARIANT)} onnx of {parent})"
        return ResolvedSource(src, pinned, checkpoint, network, label)
    if is_openvino_variant(mv):
        ir, checkpoint, parent = _exported_network(
            src, mv, pinned, files, "*.xml", "OpenVINO IR (.xml) file", tracking_uri
        )
        label = f"{src.name} v{mv.version} ({mv.tags.get(schema.VARIANT)} of {parent})"
        return ResolvedSource(src, pinned, checkpoint, label=label, ir=ir)
    hits = sorted(files.rglob("*.pt"))
    if not hits:
        raise FileNotFoundError(f"{src} (version {mv.version}) holds no checkpoint artifact")
    from montage.platform.checkpoint import resolve_checkpoint_path

    label = f"{src.name} v{mv.version} (@{src.alias})" if src.kind == "alias" else src.uri
    return ResolvedSource(src, pinned, resolve_checkpoint_path(hits[0]), label=label)


def _download_version(mv: Any, tracking_uri: str) -> Path:
    """A registry version's artifacts, fetched from where they are stored."""
    from urllib.parse import urlparse

    import mlflow
    from mlflow.exceptions import MlflowException

    location = mv.source
    if mv.model_id and location == logged_model_uri(mv.model_id):  # registered from a logged model by id
        location = client(tracking_uri).get_logged_model(mv.model_id).artifact_location
    # a local store's files are used where they are; a remote one's are copied into a folder of ours
    into = None if urlparse(location).scheme in ("", "file") else str(_download_folder(location))
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=into, tracking_uri=resolve_tracking_uri(tracking_uri)
            )
        )
    except (OSError, MlflowException) as exc:  # deleted ("No such artifact") or an unreachable store
        if into is not None:
            shutil.rmtree(into, ignore_errors=True)
        raise FileNotFoundError(
            f"{mv.name} version {mv.version}: its artifacts cannot be fetched from {location}: {exc}"
        ) from exc
