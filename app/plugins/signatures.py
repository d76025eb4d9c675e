"""Plugin request and response signatures, the computation only (docs/contracts.md, "Plugin
authentication" and "Plugin API"):

    request:  X-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{METHOD}.{path}.{raw body}")>
    response: X-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{status}.{path}.{raw body}")>

A request may carry up to four comma-separated values (a plugin in the middle of a rotation
signs with each of its secrets); it matches when one of them was made with one of the
installation's unexpired secrets. plugin_client/signing.py is the plugin's side of the same
format, written again there because the client imports nothing from app/. Where the secrets
come from and how a request is verified: app/plugins/auth.py."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

MAX_SIGNATURES = 4
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class MalformedSignature(ValueError):
    """The X-Signature header is not one to four v1=<64 hex digits> values."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    secret: bytes
    expires_at: float | None  # unix seconds; None = no expiry


def signed_message(timestamp: str, method: str, path: str, body: bytes) -> bytes:
    return f"{timestamp}.{method.upper()}.{path}.".encode() + body


def sign(secret: str, timestamp: str, method: str, path: str, body: bytes) -> str:
    """The X-Signature value a plugin sends (used by plugin_client, tests and benchmarks)."""
    mac = hmac.new(secret.encode(), signed_message(timestamp, method, path, body), hashlib.sha256)
    return "v1=" + mac.hexdigest()


def response_signature(
    secret: bytes, status: int, path: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """X-Timestamp and X-Signature of a response to a plugin (docs/contracts.md, "Plugin API"):
    v1=<hex HMAC-SHA256(secret, "{timestamp}.{status code}.{path}.{raw body}")>."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    message = f"{stamp}.{status}.{path}.".encode() + body
    return {
        "X-Timestamp": stamp,
        "X-Signature": "v1=" + hmac.new(secret, message, hashlib.sha256).hexdigest(),
    }


def parse_signatures(header: str) -> list[str]:
    """The hex digests of an X-Signature header, lower-cased; MalformedSignature otherwise."""
    values = [part.strip() for part in header.split(",") if part.strip()]
    if not values or len(values) > MAX_SIGNATURES:
        raise MalformedSignature("X-Signature must hold one to four v1=<hex> values")
    sigs = []
    for value in values:
        scheme, _, sig = value.partition("=")
        if scheme != "v1" or not _HEX64.fullmatch(sig):
            raise MalformedSignature("X-Signature values must be v1=<64 hex digits>")
        sigs.append(sig.lower())
    return sigs


def matching_secret(
    keys: Iterable[SigningKey], message: bytes, sigs: list[str], now: float
) -> bytes | None:
    """The secret one of the signatures was made with (expired keys skipped), or None."""
    for key in keys:
        if key.expires_at is not None and key.expires_at <= now:
            continue
        expected = hmac.new(key.secret, message, hashlib.sha256).hexdigest()
        for sig in sigs:
            if hmac.compare_digest(expected, sig):
                return key.secret
    return None
