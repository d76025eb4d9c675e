"""The cryptography of the seals, with no I/O.

The seal of a row is HMAC-SHA256(key, previous seal's MAC | log | row id | canonical row),
so each seal vouches for its row and for every seal before it. The key is SELFHEAL_AUDIT_KEY,
else derived from SELFHEAL_SECRET_KEY with HKDF (its own purpose label): either way a key the
database does not hold, so a database owner who rewrites a row, and re-chains the database's
own sha256 chain, cannot make a seal that matches.

A row's canonical form is a JSON object of its non-NULL columns with sorted keys: a column added
later (NULL in old rows) leaves old rows' seals valid. Timestamps are written in UTC to the
microsecond, bytes in hex, UUIDs as text.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.settings import Settings, secret_key_problem

# The logs sealed, by table name. Rows are sealed in the order they are found.
LOGS = ("audit_log", "plugin_autopatch_attempt_events")
GENESIS = bytes(32)
_PURPOSE = b"selfheal history seals v1"
_KEY_ID_PURPOSE = b"selfheal history seal key id v1"
_HEAD_PURPOSE = b"selfheal history head v1|"


@dataclass(frozen=True, slots=True)
class SealKey:
    id: str  # 8 hex digits, stored with each seal: which key made it
    secret: bytes


def derive_key(material: str) -> SealKey:
    secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PURPOSE).derive(
        material.encode()
    )
    return SealKey(
        id=hmac.new(secret, _KEY_ID_PURPOSE, hashlib.sha256).hexdigest()[:8], secret=secret
    )


def keys_of(settings: Settings, extra: Iterable[str] = ()) -> tuple[SealKey, dict[str, SealKey]]:
    """The key that seals now, and every key that verifies (by id): SELFHEAL_AUDIT_KEY, else the
    secret key; the previous secret keys (SELFHEAL_SECRET_KEY_PREVIOUS) and `extra` verify only,
    and only when they are strong keys (never the published dev key)."""
    current = derive_key(settings.audit_key or settings.secret_key)
    known = {current.id: current}
    for material in (settings.secret_key, *settings.previous_secret_keys, *extra):
        # A published or short key vouches for nothing: anyone could have sealed with it.
        if secret_key_problem(material) is None:
            key = derive_key(material)
            known.setdefault(key.id, key)
    return current, known


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        return value.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, uuid.UUID | decimal.Decimal | dt.date):
        return str(value)
    raise TypeError(f"cannot seal a {type(value).__name__}")


def canonical(row: Mapping[str, Any]) -> bytes:
    present = {k: v for k, v in row.items() if v is not None}
    return json.dumps(
        present, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain
    ).encode()


def seal(key: SealKey, previous: bytes, log: str, row_id: int, row: Mapping[str, Any]) -> bytes:
    message = previous + f"|{log}|{row_id}|".encode() + canonical(row)
    return hmac.new(key.secret, message, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Head:
    """The last seal, as exported: enough to tell later whether seals were removed or remade."""

    seq: int
    mac: str  # hex
    key_id: str
    sealed_at: str  # ISO 8601, UTC
    rows: int  # seals in the chain up to and including this one
    signature: str = ""

    def signed(self, key: SealKey) -> Head:
        return Head(**(asdict(self) | {"signature": self._signature(key)}))

    def signature_valid(self, keys: Mapping[str, SealKey]) -> bool:
        key = keys.get(self.key_id)
        return key is not None and hmac.compare_digest(self.signature, self._signature(key))

    def _signature(self, key: SealKey) -> str:
        fields = asdict(self) | {"signature": ""}
        body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(key.secret, _HEAD_PURPOSE + body, hashlib.sha256).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Head:
        data = json.loads(text)
        return cls(
            seq=int(data["seq"]),
            mac=str(data["mac"]),
            key_id=str(data["key_id"]),
            sealed_at=str(data["sealed_at"]),
            rows=int(data["rows"]),
            signature=str(data.get("signature", "")),
        )
