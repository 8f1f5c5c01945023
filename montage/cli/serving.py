"""Commands for the Serve application: serve (and serve keygen), monitor."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from montage.cli.common import resolve_config_path

log = logging.getLogger("montage")


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from montage.serve.app import load_serve_config, run

    if args.overrides[:1] == ["keygen"]:  # `montage serve keygen`: a new API key and its hash line
        from montage.serve.access import new_key

        if args.overrides[1:]:
            raise ValueError("montage serve keygen takes no arguments")
        key, line = new_key()
        print(f"API key (give it to the client; it is shown only now and never stored):\n  {key}")
        print(
            f"Add this line to the file named by auth.api_keys_file (e.g. serve_keys.txt, kept out of git):\n  {line}"
        )
        print(f"Clients send:  Authorization: Bearer {key}")
        return 0
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    cfg = load_serve_config(resolve_config_path(args.config), args.overrides)
    if args.reload:
        from montage.serve.app import ReloadError

        try:
            run(cfg, blocking=False, insecure=args.insecure)
        except ReloadError as exc:  # the running versions keep serving; /healthz says the same
            log.error("%s", exc)
            return 1
        print(f"application '{cfg.name}' updated: replicas now serve the configured sources")
        return 0
    from montage.serve.access import check_bind, resolve_settings

    access = resolve_settings(cfg.auth, cfg.cors)
    check_bind(cfg.host, access, args.insecure)  # refuse before saying "serving"
    print(f"serving on http://{cfg.host}:{cfg.port}/ (API keys {'on' if access.auth else 'off'}; Ctrl-C to stop)")
    from montage.serve.app import ReloadError

    try:
        run(cfg, blocking=True, insecure=args.insecure)
    except ReloadError as exc:  # a source that does not load (fused mode) or a version the registry lacks
        log.error("%s", exc)
        return 1
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from montage.serve.report import monitor

    return monitor(
        args.url, watch=args.watch, png=args.png, api_key=args.api_key or os.environ.get("MONTAGE_API_KEY", "")
    )


def register(sub: Any) -> None:
    sv = sub.add_parser("serve", help="the Ray Serve application (segment, harmonize, composite, pix2pix)")
    sv.add_argument("--config", help="serve YAML (e.g. serve.yaml)")
    sv.add_argument(
        "overrides",
        nargs="*",
        help="e.g. segmentation.source=runs/x/best.pt port=8080; or `keygen`: print a new API key and its hash line",
    )
    sv.add_argument(
        "--reload",
        action="store_true",
        help="update a running application (e.g. after `montage models promote`) and exit",
    )
    sv.add_argument("--address", help="Ray cluster address, e.g. auto for a `ray start` cluster")
    sv.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback host without API keys (anyone who reaches the port can call /v1/*)",
    )
    sv.set_defaults(func=cmd_serve)

    mn = sub.add_parser(
        "monitor", help="latency per stage, errors, drift and anomalies of a running application (GET /v1/monitor)"
    )
    mn.add_argument("--url", default="http://127.0.0.1:8000", help="the application's HTTP address")
    mn.add_argument("--watch", type=float, default=0, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    mn.add_argument("--png", help="write a PNG of p95 latency and drift (PSI) over time")
    mn.add_argument("--api-key", help="bearer key when the server has auth on (default $MONTAGE_API_KEY)")
    mn.set_defaults(func=cmd_monitor)
