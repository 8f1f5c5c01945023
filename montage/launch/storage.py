"""Where runs and sweeps keep their checkpoints and state: a local folder, an NFS mount, or object
storage (``s3://bucket/prefix`` on AWS or any S3-compatible server: MinIO, Ceph, a local test
endpoint; ``gs://`` through pyarrow as well).

:class:`Storage` is parsed once from config (``run.storage`` + ``run.storage_endpoint``, a tune
config's ``storage`` + ``storage_endpoint``) and hands Ray exactly what its ``RunConfig`` wants:
a path and, for object storage, a pyarrow filesystem that carries the endpoint (pickled to every
worker, so nodes need no environment of their own). :meth:`Storage.check` fails with a clear
message before any worker starts when a bucket is missing or the credentials are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from montage.core.config import ConfigError

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(ConfigError):
    """Storage that cannot be used: a missing bucket, refused credentials, an unknown scheme."""


@dataclass(frozen=True)
class Storage:
    """A storage root: ``uri`` is a local path or ``scheme://bucket/prefix``; ``endpoint`` an S3
    endpoint URL (``http://127.0.0.1:9000``) for S3-compatible servers (empty: $AWS_ENDPOINT_URL_S3,
    $AWS_ENDPOINT_URL, else AWS)."""

    uri: str
    endpoint: str = ""

    @classmethod
    def of(cls, uri: str, endpoint: str = "") -> Storage:
        if "://" not in uri:
            return cls(str(Path(uri).expanduser().resolve()))
        scheme = urlsplit(uri).scheme
        if scheme not in ("s3", "gs", "gcs", "hdfs", "file"):
            raise StorageError(f"storage {uri!r}: unknown scheme '{scheme}' (a local path, s3://, gs:// or hdfs://)")
        if scheme == "file":
            return cls(urlsplit(uri).path)
        if scheme == "s3":
            endpoint = endpoint or next((os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)), "")
        return cls(uri.rstrip("/"), endpoint)

    @property
    def remote(self) -> bool:
        return "://" in self.uri

    def child(self, *parts: str) -> Storage:
        return Storage(self.uri.rstrip("/") + "".join(f"/{p.strip('/')}" for p in parts), self.endpoint)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Storage:
        return Storage(self.uri.rstrip("/").rsplit("/", 1)[0], self.endpoint)

    # -- what Ray and pyarrow take -------------------------------------------------------
    @cached_property
    def filesystem(self) -> Any:
        """The pyarrow filesystem for a remote root (None for a local one)."""
        if not self.remote:
            return None
        from pyarrow import fs

        if self.endpoint:  # the constructor ignores AWS_ENDPOINT_URL: pass the endpoint (and keys) explicitly
            url = urlsplit(self.endpoint)
            if not url.scheme or not url.netloc:
                raise StorageError(f"storage endpoint {self.endpoint!r} is not a URL like http://host:9000")
            return fs.S3FileSystem(
                access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                session_token=os.environ.get("AWS_SESSION_TOKEN"),
                region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                scheme=url.scheme,
                endpoint_override=url.netloc,
            )
        return fs.FileSystem.from_uri(self.uri)[0]

    @property
    def path(self) -> str:
        """The root as the filesystem names it: ``bucket/prefix`` remotely, an absolute path locally."""
        if not self.remote:
            return self.uri
        split = urlsplit(self.uri)
        return f"{split.netloc}{split.path}".rstrip("/")

    def ray_args(self) -> dict[str, Any]:
        """``storage_path`` (and ``storage_filesystem``) for Ray Train's and Tune's ``RunConfig``."""
        if not self.remote:
            return {"storage_path": self.uri}
        return {"storage_path": self.path, "storage_filesystem": self.filesystem}

    # -- checks and files ------------------------------------------------------------------
    def check(self) -> None:
        """Fail now, naming the problem, when the root cannot be written (before any worker starts)."""
        if not self.remote:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
            if not os.access(self.uri, os.W_OK):
                raise StorageError(f"storage {self.uri}: not writable")
            return
        from pyarrow import fs

        bucket = self.path.split("/", 1)[0]
        where = f" at {self.endpoint}" if self.endpoint else ""
        try:
            info = self.filesystem.get_file_info(bucket)
        except OSError as exc:
            text = str(exc)
            if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text or "InvalidAccessKeyId" in text:
                key = os.environ.get("AWS_ACCESS_KEY_ID", "")
                who = f"access key …{key[-4:]} of AWS_ACCESS_KEY_ID" if key else "AWS's default chain: ~/.aws, a role"
                raise StorageError(
                    f"storage {self.uri}: access to bucket '{bucket}'{where} denied — the store refused the "
                    f"credentials ({who}) or they may not read this bucket: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (or the instance profile) and the bucket policy"
                ) from None
            raise StorageError(f"storage {self.uri}: cannot reach bucket '{bucket}'{where}: {text}") from None
        if info.type == fs.FileType.NotFound:
            raise StorageError(f"storage {self.uri}: bucket '{bucket}' does not exist{where}; create it first")

    def exists(self) -> bool:
        if not self.remote:
            return Path(self.uri).exists()
        from pyarrow import fs

        return self.filesystem.get_file_info(self.path).type != fs.FileType.NotFound

    def download(self, local: str | Path) -> Path:
        """Copy this file or folder to ``local`` (a folder); returns the local copy."""
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            return Path(self.uri)
        from pyarrow import fs

        info = self.filesystem.get_file_info(self.path)
        if info.type == fs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri} does not exist")
        target = local / self.name
        if info.type == fs.FileType.File:
            fs.copy_files(self.path, str(target), source_filesystem=self.filesystem)
        else:
            fs.copy_files(
                self.path, str(target), source_filesystem=self.filesystem, destination_filesystem=fs.LocalFileSystem()
            )
        return target

    def __str__(self) -> str:
        return self.uri


@dataclass
class StorageMirror:
    """A folder on remote storage as the durable copy of a local one (the tracking outbox of a run on
    object storage: :class:`montage.tracking.outbox.Mirror`)."""

    storage: Storage

    @property
    def where(self) -> str:
        return self.storage.uri

    def pull(self, local: Path) -> None:
        from pyarrow import fs

        filesystem = self.storage.filesystem
        files = filesystem.get_file_info(fs.FileSelector(self.storage.path, allow_not_found=True))
        for info in files:
            if info.type == fs.FileType.File:
                with filesystem.open_input_stream(info.path) as src:
                    (Path(local) / info.base_name).write_bytes(src.read())

    def push(self, local: Path, name: str) -> None:
        with self.storage.filesystem.open_output_stream(f"{self.storage.path}/{name}") as out:
            out.write((Path(local) / name).read_bytes())

    def remove(self, name: str) -> None:
        from pyarrow import fs

        path = f"{self.storage.path}/{name}"
        if self.storage.filesystem.get_file_info(path).type != fs.FileType.NotFound:
            self.storage.filesystem.delete_file(path)
