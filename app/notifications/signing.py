"""Webhook signatures: what we send and how a receiver checks it.

`X-Selfheal-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{raw body}")>` with the
endpoint's secret as printed by `selfheal notify add` (its UTF-8 bytes) and the value of
`X-Selfheal-Timestamp`. The timestamp is signed so that a captured request cannot be replayed
later; the `v1=` prefix leaves room for another scheme, and several comma-separated values
are accepted by `verify` so a future rotation can send two.

The same construction as the plugin signatures (docs/contracts.md), minus method and path: the
receiver chose its URL, and proxies in front of it may rewrite the path."""

from __future__ import annotations

import hashlib
import hmac
import time

SCHEME = "v1"
DEFAULT_TOLERANCE_S = 300


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The header value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def verify(
    secret: str,
    *,
    timestamp: str,
    signature: str,
    body: bytes,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """What a receiver does (also in Python, for tests and as the README's reference):
    recompute over the raw body bytes, compare in constant time, refuse stale timestamps."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).encode()
    return any(
        hmac.compare_digest(candidate.strip().encode(), expected)
        for candidate in signature.split(",")
    )
