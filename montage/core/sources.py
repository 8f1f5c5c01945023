"""Where a model comes from, as one value: a registry alias (``models:/<name>@<alias>``), a
registry version (``models:/<name>/<version>``), a local checkpoint (file or folder), a remote
checkpoint (``s3://…``, ``gs://…``, any ``<scheme>://``), an ONNX file (``*.onnx``) or an OpenVINO
IR (``*.xml``, its weights beside it as ``.bin``).

A string from a config file, the command line or a request becomes a :class:`ModelSource` once,
with :meth:`ModelSource.parse`, where it enters; only the object travels inward. Pure parsing:
resolving a source to files (which needs MLflow or a remote filesystem) is
:mod:`montage.tracking.sources`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from urllib.parse import urlsplit

SCHEME = "models:/"  # MLflow's model URIs
CHAMPION = "champion"  # the alias Serve, Tune and `montage models` treat as the task's current model
CHALLENGER = "challenger"  # the alias a rollout's challenger conventionally takes

KINDS = ("alias", "version", "checkpoint", "remote", "onnx", "openvino")
EXPORTED = ("onnx", "openvino")  # the kinds that are an exported network (no weights to train from)
_NAME = re.compile(r"[^/@\s]+")  # a registered model's name: no slash, no '@', no blanks
_ALIAS = re.compile(r"[\w-]+")  # MLflow's alias rule: alphanumerics, '_' and '-'
_REMOTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://.")  # scheme://something
FORMS = (
    "models:/<name>@<alias>, models:/<name>/<version>, a checkpoint path, a remote checkpoint (s3://…), an .onnx "
    "file or an OpenVINO IR .xml file"
)


def model_name(task: str) -> str:
    """The registered-model name of a task: ``montage-<task>``."""
    return f"montage-{task}"


def logged_model_uri(model_id: str) -> str:
    """MLflow's URI of a logged model (``models:/<model_id>``): what a registry version made from a
    logged model records as its ``source`` (an MLflow internal, not a montage model source)."""
    return f"{SCHEME}{model_id}"


@dataclass(frozen=True)
class ModelSource:
    """One model source; ``kind`` says which fields are set:

    - ``alias``: ``name`` + ``alias`` (what the alias names is looked up when it is used)
    - ``version``: ``name`` + ``version`` (digits)
    - ``checkpoint``: ``path`` (a checkpoint file, or a folder holding ``checkpoint.pt``)
    - ``remote``: ``path`` (a checkpoint on object storage, fetched with pyarrow's filesystems)
    - ``onnx``: ``path`` (an exported network; the checkpoint it was exported from supplies the
      task's config: see :func:`montage.tracking.sources.resolve_source`)
    - ``openvino``: ``path`` (an OpenVINO IR ``.xml``; like ``onnx``, it names its parent, in its ``rt_info``)
    """

    kind: str
    name: str = ""
    alias: str = ""
    version: str = ""
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model source kind {self.kind!r} is not one of {', '.join(KINDS)}")
        registry = self.kind in ("alias", "version")
        if registry != bool(self.name) or registry == bool(self.path):
            raise ValueError(f"a {self.kind} model source needs {'a name' if registry else 'a path'} only: {self!r}")
        if (self.kind == "alias") != bool(self.alias) or (self.kind == "version") != bool(self.version):
            raise ValueError(f"a {self.kind} model source: {self!r}")

    @classmethod
    def parse(cls, text: str | ModelSource, what: str = "model source") -> ModelSource:
        """The source a string names (an already parsed one is returned as is). A string that is none
        of the forms raises :class:`ValueError` naming it and ``what`` it was given as."""
        if isinstance(text, ModelSource):
            return text
        if not isinstance(text, str):
            raise ValueError(f"{what}: expected a string, got {type(text).__name__} {text!r}")
        s = text.strip()
        if not s:
            raise ValueError(f"{what} is empty (expected {FORMS})")
        if s.startswith(SCHEME):
            return cls._parse_registry(s, what)
        if s.lower().startswith("models:"):
            raise ValueError(
                f"{what} {text!r}: a registry source is models:/<name>@<alias> or models:/<name>/<version>"
            )
        if s.lower().endswith(".onnx"):
            return cls("onnx", path=s)
        if s.lower().endswith(".xml"):
            return cls("openvino", path=s)
        if _REMOTE.match(s):
            return cls("remote", path=s)
        if "://" in s:
            raise ValueError(f"{what} {text!r}: not a URI (<scheme>://…) nor a path (expected {FORMS})")
        return cls("checkpoint", path=s)

    @classmethod
    def _parse_registry(cls, s: str, what: str) -> ModelSource:
        ref = s[len(SCHEME) :]
        name, at, alias = ref.partition("@")
        if at:
            if not _NAME.fullmatch(name) or not _ALIAS.fullmatch(alias):
                raise ValueError(f"{what} {s!r}: expected models:/<name>@<alias> (alphanumerics, _ and - in an alias)")
            return cls("alias", name=name, alias=alias)
        name, slash, version = ref.rpartition("/")
        if not slash or not _NAME.fullmatch(name) or not version.isdigit():
            raise ValueError(
                f"{what} {s!r} names no alias or version: expected models:/<name>@<alias> or models:/<name>/<version>"
            )
        return cls("version", name=name, version=str(int(version)))

    @classmethod
    def registered(cls, name: str, alias: str = "", version: str | int = "") -> ModelSource:
        """``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
        if bool(alias) == bool(str(version)):
            raise ValueError(f"a registry source of {name!r} names an alias or a version (got {alias!r}, {version!r})")
        return cls.parse(f"{SCHEME}{name}@{alias}" if alias else f"{SCHEME}{name}/{version}")

    @classmethod
    def champion(cls, task: str) -> ModelSource:
        """``models:/montage-<task>@champion``: the default source of every command."""
        return cls("alias", name=model_name(task), alias=CHAMPION)

    @property
    def in_registry(self) -> bool:
        return self.kind in ("alias", "version")

    @property
    def local(self) -> bool:
        """A file or folder on this machine (a checkpoint, or an ONNX / IR file without a scheme)."""
        return self.kind == "checkpoint" or (self.kind in EXPORTED and not _REMOTE.match(self.path))

    @property
    def uri(self) -> str:
        """The string it was parsed from (normalised: ``models:/n/07`` → ``models:/n/7``, no blanks around)."""
        if self.kind == "alias":
            return f"{SCHEME}{self.name}@{self.alias}"
        if self.kind == "version":
            return f"{SCHEME}{self.name}/{self.version}"
        return self.path

    @property
    def file_name(self) -> str:
        """The last part of a path or URI (no query): what a series calls a checkpoint or exported source."""
        if self.in_registry:
            return self.uri
        path = urlsplit(self.path).path if _REMOTE.match(self.path) else self.path
        return PurePath(path).name or self.path

    def at_version(self, version: str | int) -> ModelSource:
        """The same registered model at ``version`` (e.g. what an alias names now)."""
        if not self.in_registry:
            raise ValueError(f"{self.uri} is not a registry source: it has no versions")
        return ModelSource.registered(self.name, version=version)

    def __str__(self) -> str:
        return self.uri
