"""The ``montage`` command line, one module per group of commands:

- :mod:`~montage.cli.training`: ``train``, ``tune``, ``submit``, ``predict``, ``config``, ``tasks``, ``demo``
- :mod:`~montage.cli.models`: ``models`` (list, promote), ``export``, ``optimize``
- :mod:`~montage.cli.serving`: ``serve`` (and ``serve keygen``), ``monitor``
- :mod:`~montage.cli.rollout`: ``rollout`` (status, promote, rollback)
- :mod:`~montage.cli.toolbox`: ``check``, ``lr-find``, ``cv``, ``openvino``
- :mod:`~montage.cli.data`: ``data`` (``data check``, ``data catflw``, ...), ``evaluate``
- :mod:`~montage.cli.report`: ``report`` (sweep, runs, versions)

Each module's ``register(sub)`` adds its sub-commands; :func:`main` parses, sets up logging and
turns the errors a user can fix (bad config, unknown name, missing file, ...) into one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

from montage.cli.common import LAUNCHED_AT  # noqa: F401  (first: the clock starts before the heavy imports)
from montage.core.logs import setup_logging  # light: no torch, Ray or MLflow

log = logging.getLogger("montage")

GROUPS = ("training", "models", "serving", "rollout", "toolbox", "data", "report")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(
        prog="montage", description="Distributed training, tuning and serving of photo-compositing models on Ray."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, Ray and MLflow included")
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in GROUPS:
        importlib.import_module(f"montage.cli.{group}").register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from montage.core.config import ConfigError
    from montage.core.errors import CheckpointError, ExportError
    from montage.core.registry import UnknownNameError

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):  # key=value pairs given after options
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra and not getattr(args, "wants_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, quiet_ray=not args.verbose)
    try:
        return args.func(args, extra) if getattr(args, "wants_extra", False) else args.func(args)
    except (
        ConfigError,
        UnknownNameError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        ValueError,  # ImageError and the other bad-input errors among them
        ExportError,
    ) as exc:
        log.error("%s", exc)
        return 2
