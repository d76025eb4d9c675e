"""Everything the client signs or verifies.

- Requests: `X-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{METHOD}.{path}.{raw body}")>`
  (docs/contracts.md, "Plugin authentication").
- Responses: the control plane signs its 200 answers the same way with the status code in
  place of the method; a response that does not verify carries no command we run. The 401
  `replay` answer to a heartbeat is signed too, and names the digest of the stored request
  (`request_digest`).
- Releases: an update (or a rollback naming a signed release) carries a statement signed with
  Ed25519 by the release manager's key; the client checks it against the pinned public keys.
  The server side of this format is app/releases/signing.py; it is re-implemented here because
  the client imports nothing from the control plane (and uses no orjson: `json.dumps` with
  sorted keys and compact separators gives the same canonical bytes)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from plugin_client.errors import CommandRefused

SIGNATURE_TOLERANCE_S = 300
STATEMENT_VERSION = 1
_STATEMENT_KEYS = frozenset({"v", "plugin", "version", "sha256", "expires_at"})
_EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_EXPIRES_PATTERN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_MAX_SIGNATURES = 4


def _message(timestamp: str, middle: str, path: str, body: bytes) -> bytes:
    return f"{timestamp}.{middle}.{path}.".encode() + body


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign_request(
    secret: str, method: str, path: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """X-Timestamp and X-Signature for a request (add X-Plugin-Id yourself). `path` is the
    URL path without the query string, exactly as sent."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = _mac(secret.encode(), _message(stamp, method.upper(), path, body))
    return {"X-Timestamp": stamp, "X-Signature": "v1=" + signature}


def request_digest(timestamp: str, method: str, path: str, body: bytes) -> str:
    """Hex SHA-256 of a request's signed message: the control plane's replay key, which a
    signed 401 `replay` answer to a heartbeat names."""
    return hashlib.sha256(_message(timestamp, method.upper(), path, body)).hexdigest()


def sign_response(
    secret: str, status_code: int, path: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The headers a control plane puts on a response (used by tests and fake servers)."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = _mac(secret.encode(), _message(stamp, str(status_code), path, body))
    return {"X-Timestamp": stamp, "X-Signature": "v1=" + signature}


def response_problem(
    secret: str,
    status_code: int,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
) -> str | None:
    """None when the response is signed by the installation's secret within the tolerance;
    otherwise the reason, fit for a command's `fail` report."""
    timestamp = headers.get("x-timestamp")
    signature = headers.get("x-signature")
    if not timestamp or not signature:
        return "unsigned response: the control plane's answer has no X-Timestamp/X-Signature"
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return "response signature does not verify: X-Timestamp is not unix seconds"
    moment = time.time() if now is None else now
    if abs(moment - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        return (
            "response signature does not verify: its timestamp is more than"
            f" {SIGNATURE_TOLERANCE_S} s away from this machine's clock"
        )
    values = [part.strip() for part in signature.split(",") if part.strip()]
    expected = _mac(secret.encode(), _message(timestamp, str(status_code), path, body))
    for value in values[:_MAX_SIGNATURES]:
        scheme, _, digest = value.partition("=")
        if (
            scheme == "v1"
            and _HEX64.match(digest)
            and hmac.compare_digest(expected, digest.lower())
        ):
            return None
    return "response signature does not verify (HMAC mismatch)"


# --- release statements ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    """The fields of a verified release statement."""

    plugin: str
    version: str
    sha256: str
    expires_at: datetime


def parse_public_keys(keys: Sequence[str]) -> list[Ed25519PublicKey]:
    """Pinned keys: base64 of raw 32-byte Ed25519 public keys (ValueError naming a bad one)."""
    parsed = []
    for index, key in enumerate(keys):
        text = key.strip()
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError(f"public key #{index + 1} is not valid base64") from None
        if len(raw) != 32:
            raise ValueError(
                f"public key #{index + 1} must be 32 bytes (base64 of a raw Ed25519 public"
                f" key), got {len(raw)}"
            )
        parsed.append(Ed25519PublicKey.from_public_bytes(raw))
    return parsed


def format_expiry(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_EXPIRES_FORMAT)


def canonical_statement(*, plugin: str, version: str, sha256: str, expires_at: str) -> bytes:
    """The exact bytes the release manager signs (what orjson with sorted keys produces)."""
    return json.dumps(
        {
            "v": STATEMENT_VERSION,
            "plugin": plugin,
            "version": version,
            "sha256": sha256,
            "expires_at": expires_at,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


def parse_statement(signed: str) -> Statement:
    """The statement's fields, checked for shape and canonical form (CommandRefused)."""
    try:
        data = json.loads(signed)
    except ValueError:
        raise CommandRefused("signed statement is unreadable: not JSON") from None
    if not isinstance(data, dict) or set(data) != _STATEMENT_KEYS:
        raise CommandRefused(
            f"signed statement is unreadable: it must have exactly the keys"
            f" {sorted(_STATEMENT_KEYS)}"
        )
    version_field = data["v"]
    if isinstance(version_field, bool) or version_field != STATEMENT_VERSION:
        raise CommandRefused(f"signed statement has unsupported version v={version_field!r}")
    for field in ("plugin", "version", "sha256", "expires_at"):
        if not isinstance(data[field], str):
            raise CommandRefused(f"signed statement is unreadable: {field} is not a string")
    if not _EXPIRES_PATTERN.match(data["expires_at"]):
        raise CommandRefused(
            "signed statement is unreadable: expires_at is not YYYY-MM-DDTHH:MM:SSZ"
        )
    try:
        expires_at = datetime.strptime(data["expires_at"], _EXPIRES_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise CommandRefused("signed statement is unreadable: expires_at is not a date") from None
    # One statement, one spelling: what was signed must be exactly what we re-encode, so two
    # JSON parsers can never read different fields out of it (duplicate keys, escapes, spaces).
    again = canonical_statement(
        plugin=data["plugin"],
        version=data["version"],
        sha256=data["sha256"],
        expires_at=data["expires_at"],
    )
    if again != signed.encode("utf-8"):
        raise CommandRefused("signed statement is not canonical JSON (sorted keys, no spaces)")
    return Statement(
        plugin=data["plugin"],
        version=data["version"],
        sha256=data["sha256"],
        expires_at=expires_at,
    )


def _decode_signature(value: str) -> bytes:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise CommandRefused("release signature is not valid base64") from None
    if len(raw) != 64:
        raise CommandRefused(f"release signature must be 64 bytes, got {len(raw)}")
    return raw


def verify_release(
    keys: Sequence[Ed25519PublicKey],
    *,
    version: str,
    sha256: str,
    signature: str,
    signed: str,
    plugin: str,
    now: datetime | None = None,
) -> Statement:
    """What the client does with an update (or signed rollback) before downloading anything:
    some pinned key must verify the signature over the `signed` bytes; the statement must be
    canonical, name this plugin, the payload's version and sha256, and not have expired.
    Returns the statement; raises CommandRefused with the reason otherwise."""
    if not keys:
        raise CommandRefused(
            "release signature cannot be verified: no public key is pinned"
            " (public_keys= or SELFHEAL_PUBLIC_KEYS)"
        )
    raw_signature = _decode_signature(signature)
    message = signed.encode("utf-8")
    for key in keys:
        try:
            key.verify(raw_signature, message)
        except InvalidSignature:
            continue
        break
    else:
        raise CommandRefused("bad or unknown release signature: no pinned public key verifies it")
    statement = parse_statement(signed)
    if statement.plugin != plugin:
        raise CommandRefused(
            f"release is for another plugin: the statement names {statement.plugin!r},"
            f" this is {plugin!r}"
        )
    if statement.version != version:
        raise CommandRefused(
            f"payload version {version!r} is not the signed version {statement.version!r}"
        )
    if not _SHA256_PATTERN.match(statement.sha256):
        raise CommandRefused("signed statement is unreadable: sha256 is not 64 lowercase hex")
    if statement.sha256 != sha256:
        raise CommandRefused("payload sha256 is not the signed sha256")
    moment = datetime.now(UTC) if now is None else now
    if moment >= statement.expires_at:
        raise CommandRefused(f"release statement expired at {format_expiry(statement.expires_at)}")
    return statement
