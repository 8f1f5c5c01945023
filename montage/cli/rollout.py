"""``montage rollout status|promote|rollback <task> --url …``: champion and challenger side by side
(from ``GET /v1/monitor``), and the registry step + reload that ends a rollout."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from montage.cli.common import resolve_config_path
from montage.serve.report import format_rollout

log = logging.getLogger("montage")


def _side(args: argparse.Namespace) -> dict[str, Any]:
    from montage.serve.report import fetch

    doc = fetch(args.url, args.api_key or os.environ.get("MONTAGE_API_KEY", ""))
    side = doc.get("rollout", {}).get(args.task)
    if side is None:
        raise ValueError(
            f"{args.url} runs no challenger for {args.task} (rollouts: {', '.join(doc.get('rollout', {})) or 'none'})"
        )
    return side


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.action == "status":
        print(format_rollout(args.task, _side(args)))
        return 0
    from montage.serve.app import load_serve_config, run
    from montage.tracking import registry
    from montage.tracking.runs import resolve_tracking_uri

    cfg = load_serve_config(resolve_config_path(args.config), args.overrides)
    source = getattr(cfg, args.task).arm_source(args.task, "challenger")
    if source is None:
        raise ValueError(f"{args.task}.challenger is not set in the serve config")
    if not source.in_registry:
        raise ValueError(
            f"the challenger {source} is not a registry version: {args.action} it by editing {args.task}.source /"
            f" {args.task}.challenger in the serve config and `montage serve --reload`"
        )
    side = _side(args) if args.url else None
    if side is not None and args.action == "promote" and side["verdict"] != "promote" and not args.force:
        print(format_rollout(args.task, side))
        log.error("the verdict is %s, not promote (--force to promote anyway)", side["verdict"])
        return 1
    uri = resolve_tracking_uri(cfg.tracking_uri)
    version = registry.resolve_version(source, uri)
    reason = "; ".join(side["reasons"]) if side else "by request"
    if args.action == "promote":
        before = registry.promote_challenger(source, version, uri, reason)
        print(f"{args.task}: version {version} is now @champion (was {before or 'none'})")
    else:
        registry.retire_challenger(source, version, uri, reason)
        print(f"{args.task}: challenger version {version} rolled back")
    if args.no_reload:
        print("not reloaded: run `montage serve --reload` to serve the registry's state")
        return 0
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    from montage.serve.app import ReloadError

    try:
        run(cfg, blocking=False, insecure=True)  # a reload of a running application: its bind was checked at start
    except ReloadError as exc:
        log.error("%s", exc)
        return 1
    print(f"application '{cfg.name}' reloaded")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("rollout", help="champion vs challenger of a running application: status, promote, rollback")
    p.add_argument("action", choices=("status", "promote", "rollback"))
    p.add_argument("task", choices=("segmentation", "harmonization", "pix2pix"))
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the application's HTTP address ('' to skip)")
    p.add_argument("--config", help="the serve YAML the application runs (promote/rollback reload it)")
    p.add_argument("overrides", nargs="*", help="serve config overrides, as for `montage serve`")
    p.add_argument("--api-key", help="bearer key when the server has auth on (default $MONTAGE_API_KEY)")
    p.add_argument("--force", action="store_true", help="promote although the verdict is not promote")
    p.add_argument("--no-reload", action="store_true", help="only move the registry aliases")
    p.add_argument("--address", help="Ray cluster address of the application, e.g. auto")
    p.set_defaults(func=cmd_rollout)
