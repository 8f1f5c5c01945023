"""Who may call the service and what an overloaded service answers.

- Optional bearer API keys: the server holds only SHA-256 hashes of the keys (from
  ``auth.api_keys_file``, one hash a line, and/or raw keys in the environment variable named
  by ``auth.api_keys_env``); every ``/v1/*`` request needs ``Authorization: Bearer <key>``,
  checked in constant time; ``/healthz``, ``/``, ``/docs`` and ``/openapi.json`` stay open.
- CORS off by default; ``cors.allow_origins`` is an allow-list (Starlette's CORSMiddleware).
- Backpressure: a model deployment's full queue raises ``BackPressureError`` in the ingress;
  Serve answers it 503 + ``Retry-After`` (from ``backpressure_config``) in plain text, which
  :class:`_JsonOverload` turns into a JSON ``detail``. The proxy's own 503, for a full ingress
  queue, never reaches the app: plain text with the same ``Retry-After``.

The keys are resolved to hashes in the driver (``build_app``) and handed to the ingress
replica, which installs them into this module's process-wide :data:`_SETTINGS` (one ingress
replica per process): the middleware is part of the FastAPI app that Serve freezes at import,
so it reads its settings from here rather than from its constructor.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from montage.core.serve_sections import AuthConfig, CorsConfig

log = logging.getLogger("montage.serve")

HASH_PREFIX = "sha256:"
PROTECTED_PREFIX = "/v1/"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AccessSettings:
    """What the ingress replica enforces (built in the driver, passed to the replica)."""

    key_hashes: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    retry_after_s: float = 1.0
    max_body_bytes: int = 0  # 0: no check; a declared Content-Length above it is refused before the body is read

    @property
    def auth(self) -> bool:
        return bool(self.key_hashes)


_SETTINGS = AccessSettings()


def configure(settings: AccessSettings) -> None:
    """Install the settings for this process (the ingress replica's constructor calls it)."""
    global _SETTINGS
    _SETTINGS = settings
    log.info(
        "access: auth %s, CORS origins %s", "on" if settings.auth else "off", list(settings.allow_origins) or "none"
    )


def current() -> AccessSettings:
    return _SETTINGS


# ------------------------------------------------------------------------------- keys


def hash_key(key: str) -> str:
    """A key → its hex SHA-256 (what the keys file holds, after ``sha256:``)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh random key (256 bits, URL-safe) and the line to add to the keys file."""
    key = secrets.token_urlsafe(32)
    return key, f"{HASH_PREFIX}{hash_key(key)}"


def _parse_hash(text: str, where: str) -> str:
    value = text[len(HASH_PREFIX) :] if text.startswith(HASH_PREFIX) else text
    value = value.lower()
    if not _HEX64.match(value):
        raise ValueError(
            f"{where}: expected 'sha256:<64 hex digits>' (from `montage serve keygen`), got {text[:12]!r}..."
        )
    return value


def read_key_hashes(path: str | Path) -> list[str]:
    """The hashes in a keys file: one a line, blank lines and ``#`` comments ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"auth.api_keys_file: {p} does not exist")
    hashes = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            hashes.append(_parse_hash(text, f"{p}:{n}"))
    return hashes


def resolve_settings(
    auth: AuthConfig,
    cors: CorsConfig,
    retry_after_s: float = 1.0,
    max_body_bytes: int = 0,
    environ: dict[str, str] | None = None,
) -> AccessSettings:
    """The config → the hashes and origins the replica enforces. A configured but empty source
    is an error: a typo must not silently switch auth off."""
    env = os.environ if environ is None else environ
    hashes: list[str] = []
    if auth.api_keys_file:
        found = read_key_hashes(auth.api_keys_file)
        if not found:
            raise ValueError(f"auth.api_keys_file: {auth.api_keys_file} holds no key hashes")
        hashes += found
    if auth.api_keys_env:
        raw = env.get(auth.api_keys_env, "")
        keys = [k for k in re.split(r"[\s,]+", raw) if k]
        if not keys:
            raise ValueError(f"auth.api_keys_env: the environment variable {auth.api_keys_env} is unset or empty")
        hashes += [_parse_hash(k, auth.api_keys_env) if k.startswith(HASH_PREFIX) else hash_key(k) for k in keys]
    for origin in cors.allow_origins:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ValueError(
                f"cors.allow_origins: {origin!r} is not an origin like https://example.com (scheme://host[:port], no "
                "path)"
            )
    return AccessSettings(tuple(dict.fromkeys(hashes)), tuple(cors.allow_origins), retry_after_s, max_body_bytes)


def key_matches(presented: str, key_hashes: tuple[str, ...]) -> bool:
    """Constant-time: the presented key's hash is compared with every stored hash."""
    digest = hash_key(presented)
    ok = False
    for stored in key_hashes:
        ok |= hmac.compare_digest(digest, stored)
    return ok


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: AccessSettings, insecure: bool = False) -> None:
    """Refuse to expose the API beyond this machine without keys, unless told to."""
    if is_loopback(host) or settings.auth or insecure:
        if not is_loopback(host) and not settings.auth:
            log.warning(
                "serving on %s WITHOUT API keys (--insecure): anyone who reaches this port can call /v1/*", host
            )
        return
    raise ValueError(
        f"refusing to serve on {host} (reachable beyond this machine) without API keys: create one with "
        "`montage serve keygen`, add its hash line to a file and set auth.api_keys_file=<file> "
        "(or auth.api_keys_env=<VAR>), or pass --insecure to serve openly anyway"
    )


# ------------------------------------------------------------------------- HTTP side


def unauthorized(detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _bearer(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class AccessMiddleware:
    """Pure ASGI: CORS (when origins are configured) around the API-key check on ``/v1/*``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._for: AccessSettings | None = None
        self._chain: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = current()
        if self._for is not settings:
            guard = _Guard(self.app, settings)
            self._chain = (
                CORSMiddleware(
                    guard,
                    allow_origins=list(settings.allow_origins),
                    allow_methods=["GET", "POST"],
                    allow_headers=["Authorization", "Content-Type"],
                    max_age=600,
                )
                if settings.allow_origins
                else guard
            )
            self._for = settings
        await self._chain(scope, receive, send)


class _Guard:
    def __init__(self, app: Any, settings: AccessSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.settings.auth:
            path = scope.get("path", "")
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if path.startswith(PROTECTED_PREFIX) or path == PROTECTED_PREFIX.rstrip("/"):
                token = _bearer(scope)
                if token is None:
                    await unauthorized("missing 'Authorization: Bearer <key>' header")(scope, receive, send)
                    return
                if not token or not key_matches(token, self.settings.key_hashes):
                    await unauthorized("invalid API key")(scope, receive, send)
                    return
        limit = self.settings.max_body_bytes
        if limit:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                detail = f"the request body is {declared} bytes; the limit is {limit}"
                await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, _JsonOverload(send))


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _JsonOverload:
    """Wraps ``send``: a 503 that is not JSON — Serve's own answer to a ``BackPressureError`` from a
    model handle (Serve installs that handler on the app at replica start, over any of ours) —
    becomes ``{"detail": ...}`` JSON; status and ``Retry-After`` are kept."""

    def __init__(self, send: Any) -> None:
        self.send, self.start, self.body = send, None, b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] == 503:
            headers = dict(message.get("headers", []))
            if not headers.get(b"content-type", b"").startswith(b"application/json"):
                self.start = message
                return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.body += message.get("body", b"")
        if message.get("more_body"):
            return
        text = self.body.decode("utf-8", "replace").strip() or "no capacity"
        retry = dict(self.start.get("headers", [])).get(b"retry-after")
        detail = f"the service is overloaded: {text}" + (f" (retry after {retry.decode()} s)" if retry else "")
        body = json.dumps({"detail": detail}).encode()
        headers = [(k, v) for k, v in self.start.get("headers", []) if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if retry is None:
            headers.append((b"retry-after", str(max(1, math.ceil(current().retry_after_s))).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


def install(api: Any) -> None:
    """Add the access middleware (keys, CORS, body limit, JSON 503s) to the FastAPI app."""
    api.add_middleware(AccessMiddleware)
