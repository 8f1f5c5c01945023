"""Serve's guards without Ray: API keys (file, environment, constant-time match), a non-loopback bind
needing keys, ``montage serve --keygen``, the overload options, Serve's plain 503 turned into a JSON
``detail``, and EXIF orientation applied to masks as to images (the live application: test_serve_hardening)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from serve_helpers import img, pil_bytes

from montage.serve import access


def test_keys_file_env_and_constant_time_match(tmp_path) -> None:
    key, line = access.new_key()
    assert line == f"sha256:{access.hash_key(key)}" and len(key) >= 40
    keys = tmp_path / "serve.keys"
    keys.write_text(f"# montage API keys\n\n{line}   # alice\n{access.hash_key('bob-key').upper()}\n")
    settings = access.resolve_settings(access.AuthConfig(api_keys_file=str(keys)), access.CorsConfig())
    assert settings.auth and len(settings.key_hashes) == 2
    assert access.key_matches(key, settings.key_hashes) and access.key_matches("bob-key", settings.key_hashes)
    assert not access.key_matches(key[:-1], settings.key_hashes) and not access.key_matches("", settings.key_hashes)

    env = {"MONTAGE_API_KEYS": "k1, k2\nk3"}
    from_env = access.resolve_settings(
        access.AuthConfig(api_keys_env="MONTAGE_API_KEYS"), access.CorsConfig(), environ=env
    )
    assert all(access.key_matches(k, from_env.key_hashes) for k in ("k1", "k2", "k3")) and not access.key_matches(
        "k4", from_env.key_hashes
    )
    assert "k1" not in "".join(from_env.key_hashes)  # only hashes travel to the replicas

    assert not access.resolve_settings(access.AuthConfig(), access.CorsConfig()).auth  # off by default
    bad = tmp_path / "bad.keys"
    bad.write_text("not-a-hash\n")
    with pytest.raises(ValueError, match="64 hex"):
        access.resolve_settings(access.AuthConfig(api_keys_file=str(bad)), access.CorsConfig())
    (tmp_path / "empty.keys").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="no key hashes"):  # a configured but empty source must not switch auth off
        access.resolve_settings(access.AuthConfig(api_keys_file=str(tmp_path / "empty.keys")), access.CorsConfig())
    with pytest.raises(ValueError, match="unset or empty"):
        access.resolve_settings(access.AuthConfig(api_keys_env="NOPE_NOT_SET"), access.CorsConfig(), environ={})
    with pytest.raises(FileNotFoundError):
        access.resolve_settings(access.AuthConfig(api_keys_file=str(tmp_path / "missing")), access.CorsConfig())
    with pytest.raises(ValueError, match="not an origin"):
        access.resolve_settings(access.AuthConfig(), access.CorsConfig(allow_origins=["example.com/path"]))


def test_non_loopback_bind_needs_keys_or_insecure(caplog) -> None:
    none, keyed = access.AccessSettings(), access.AccessSettings(key_hashes=(access.hash_key("k"),))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        access.check_bind(host, none)
    for host in ("0.0.0.0", "10.0.0.5", "::", "myhost.example"):
        with pytest.raises(ValueError, match="--insecure"):
            access.check_bind(host, none)
        access.check_bind(host, keyed)
    with caplog.at_level(logging.WARNING, logger="montage.serve"):
        access.check_bind("0.0.0.0", none, insecure=True)
    assert "WITHOUT API keys" in caplog.text


def test_cli_keygen_and_refusal(capsys, caplog) -> None:
    from montage.cli import main

    assert main(["serve", "keygen"]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    key, hash_line = lines[1], lines[3]
    assert hash_line == f"sha256:{access.hash_key(key)}" and f"Bearer {key}" in out
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "host=0.0.0.0", "port=1"]) == 2  # refused before Ray or Serve start
    assert "--insecure" in caplog.text and "serving on" not in capsys.readouterr().out


def test_overload_options_from_config() -> None:
    from montage.serve.app import _overload, load_serve_config

    cfg = load_serve_config(
        None,
        [
            "segmentation.max_ongoing_requests=2",
            "segmentation.max_queued_requests=3",
            "ingress_max_queued_requests=-1",
            "retry_after_s=4",
        ],
    )
    opts = _overload(
        "segmentation", cfg.segmentation.max_ongoing_requests, cfg.segmentation.max_queued_requests, cfg.retry_after_s
    )
    assert opts == {
        "max_ongoing_requests": 2,
        "max_queued_requests": 3,
        "backpressure_config": {"status_code": 503, "retry_after_s": 4.0},
    }
    assert (
        _overload("ingress", cfg.ingress_max_ongoing_requests, cfg.ingress_max_queued_requests, 1.0)[
            "max_queued_requests"
        ]
        == -1
    )
    with pytest.raises(ValueError, match="max_queued_requests"):
        _overload("harmonization", 4, 0, 1.0)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        _overload("harmonization", 0, 4, 1.0)


def test_plain_503_from_serve_becomes_json_detail() -> None:
    """Serve answers a model's BackPressureError with a plain-text 503 + Retry-After (its handler
    replaces any of ours at replica start); the access middleware makes it a JSON detail."""
    import asyncio

    from starlette.responses import Response

    async def run(app) -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/segment", "root_path": "", "headers": []}
        await access.AccessMiddleware(app)(scope, receive, send)
        return sent

    serve_503 = Response(
        "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).",
        status_code=503,
        headers={"Retry-After": "2"},
    )
    start, body = asyncio.run(run(serve_503))
    headers = dict(start["headers"])
    assert (
        start["status"] == 503 and headers[b"retry-after"] == b"2" and headers[b"content-type"] == b"application/json"
    )
    detail = json.loads(body["body"])["detail"]
    assert (
        "overloaded" in detail
        and "max_queued_requests=1" in detail
        and int(headers[b"content-length"]) == len(body["body"])
    )
    start, body = asyncio.run(run(Response(b"", status_code=503)))  # no Retry-After of its own: the configured default
    assert dict(start["headers"])[b"retry-after"] == b"1" and "overloaded" in json.loads(body["body"])["detail"]
    ok = asyncio.run(run(Response(b"png bytes", status_code=200, media_type="image/png")))
    assert ok[0]["status"] == 200 and ok[1]["body"] == b"png bytes"  # everything else passes untouched


def test_exif_orientation_applies_to_masks_too() -> None:
    """OpenCV applies EXIF orientation except when decoding 'unchanged' (masks keep their alpha):
    all eight orientations of a mask come out as the photo they belong to is shown."""
    from PIL import Image

    from montage.platform.imaging import decode_image
    from montage.serve.imaging import Limits, decode_upload

    stored = img(24, 40, 11)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = pil_bytes(stored, "JPEG", exif=exif, quality=100)
        shown, mask = decode_image(data, mode="rgb"), decode_upload(data, "mask", Limits(), mode="unchanged")
        assert mask.shape == shown.shape and np.array_equal(mask, shown), orientation
