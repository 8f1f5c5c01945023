"""Errors that the command line reports as one clear line (exit 2), defined here, below the modules that
raise them, so that ``montage`` can catch them without importing torch for ``--help`` or a bad argument."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another task or model."""


class ExportError(RuntimeError):
    """The network could not be exported, or its export does not match PyTorch."""
