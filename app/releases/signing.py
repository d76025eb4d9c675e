"""Release signatures: what `selfheal release add` signs and what a plugin checks before it
applies an update or a rollback (docs/contracts.md, "Plugin API", update/rollback payloads).

The signed statement is canonical JSON (sorted keys, no spaces, UTF-8):

    {"expires_at":"2027-01-01T00:00:00Z","plugin":"payments","sha256":"<hex>","v":1,
     "version":"1.2.3"}

and the signature is base64 of the Ed25519 signature over exactly those bytes. The statement
travels verbatim in the payload (`signed`), so a client never re-serialises anything: it
verifies the bytes it received, then compares the statement's fields with the payload's and
with the plugin it is. The artifact URL is deliberately not bound: the sha256 pins the bytes,
so a release can move to a mirror without a new signature.

Only the release manager's machine holds the private key (PEM PKCS8, mode 0600). The control
plane stores signatures made once, at `release add`, with an expiry; API and workers never
need the key, and a stolen database cannot mint a release. Plugins pin the public key: base64
of its raw 32 bytes, as `selfheal keys generate` prints it.

This module imports nothing from the rest of the application, so a plugin client can embed
it (it needs `cryptography` and `orjson`)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

if TYPE_CHECKING:
    from app.core.settings import Settings

STATEMENT_VERSION = 1
KEY_FILENAME = "release-signing.pem"
_STATEMENT_KEYS = frozenset({"v", "plugin", "version", "sha256", "expires_at"})
_EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_EXPIRES_PATTERN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


class SignatureRejected(Exception):
    """A payload a plugin must not apply. `reason` names what is wrong, for the command's
    `fail` report and the operator reading it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SigningKeyError(Exception):
    """The signing key file is missing, unreadable or not an Ed25519 key."""


@dataclass(frozen=True, slots=True)
class Statement:
    """The fields of a signed statement."""

    plugin: str
    version: str
    sha256: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Signer:
    """The private key, loaded. Kept in a wrapper so callers cannot confuse it with a public
    key, and so nothing but `sign_statement` signs with it."""

    private_key: Ed25519PrivateKey

    @property
    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key)


def key_path(settings: Settings) -> Path:
    """SELFHEAL_SIGNING_KEY_FILE, or `keys/release-signing.pem` under SELFHEAL_DATA_DIR."""
    return settings.signing_key_file or settings.data_dir / "keys" / KEY_FILENAME


def generate_key(path: Path, force: bool = False) -> Signer:
    """Create a new key at `path` (mode 0600; a directory it creates gets 0700).

    Without `force` an existing file is never touched (FileExistsError): plugins pin the public
    key, and replacing it silently would make every release signed afterwards unverifiable for
    them. With `force` the new key replaces the old one atomically (written next to it, then
    renamed), so a crash never leaves half a key."""
    _make_private_dirs(path.parent)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not force:
        # O_EXCL: two concurrent `keys generate` cannot both win.
        _write_private(path, pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        return Signer(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_private(tmp, pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return Signer(key)


def _make_private_dirs(directory: Path) -> None:
    """Create missing directories with mode 0700. Existing ones are left alone: the key file
    may be configured into a directory the operator owns for other reasons."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask


def _write_private(path: Path, data: bytes, flags: int) -> None:
    # O_NOFOLLOW: never write the key through a symlink someone left in our place.
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have removed bits; nobody else may read it
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def load_signer(path: Path) -> Signer:
    """The key at `path`; SigningKeyError (naming the file and the fix) when it is not usable."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(
            f"no release signing key at {path} (create one with `selfheal keys generate`)"
        ) from None
    except OSError as exc:
        raise SigningKeyError(f"cannot read the release signing key {path}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return Signer(key)


def public_key_b64(key: Signer | Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key: short enough to paste into a plugin's config."""
    if isinstance(key, Signer):
        key = key.private_key
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def format_expiry(moment: datetime) -> str:
    """ISO-8601 UTC to the second with a `Z`: one spelling per instant, so the statement is
    canonical whatever time zone the signer's machine is in."""
    if moment.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware")
    return moment.astimezone(UTC).strftime(_EXPIRES_FORMAT)


def parse_expiry(value: str) -> datetime:
    if not _EXPIRES_PATTERN.match(value):
        raise ValueError(f"expires_at {value!r} is not YYYY-MM-DDTHH:MM:SSZ")
    return datetime.strptime(value, _EXPIRES_FORMAT).replace(tzinfo=UTC)


def canonical_statement(*, plugin: str, version: str, sha256: str, expires_at: datetime) -> bytes:
    """The exact bytes that are signed."""
    return orjson.dumps(
        {
            "v": STATEMENT_VERSION,
            "plugin": plugin,
            "version": version,
            "sha256": sha256,
            "expires_at": format_expiry(expires_at),
        },
        option=orjson.OPT_SORT_KEYS,
    )


def sign_statement(
    signer: Signer, *, plugin: str, version: str, sha256: str, expires_at: datetime
) -> tuple[str, str]:
    """(statement, base64 signature). The statement is returned as text because it is stored
    and sent verbatim; it is pure ASCII for the names and versions we accept."""
    if not _SHA256_PATTERN.match(sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    statement = canonical_statement(
        plugin=plugin, version=version, sha256=sha256, expires_at=expires_at
    )
    signature = signer.private_key.sign(statement)
    return statement.decode("utf-8"), base64.b64encode(signature).decode("ascii")


def parse_statement(signed: str) -> Statement:
    """The statement's fields, checked for shape and canonical form (ValueError otherwise).
    Does not check the signature: see `verify_payload`."""
    try:
        data = orjson.loads(signed)
    except orjson.JSONDecodeError:
        raise ValueError("the signed statement is not JSON") from None
    if not isinstance(data, dict) or set(data) != _STATEMENT_KEYS:
        raise ValueError(
            f"the signed statement must have exactly the keys {sorted(_STATEMENT_KEYS)}"
        )
    if data["v"] != STATEMENT_VERSION or isinstance(data["v"], bool):
        raise ValueError(f"unsupported statement version {data['v']!r}")
    for field in ("plugin", "version", "sha256", "expires_at"):
        if not isinstance(data[field], str):
            raise ValueError(f"the statement's {field} is not a string")
    statement = Statement(
        plugin=data["plugin"],
        version=data["version"],
        sha256=data["sha256"],
        expires_at=parse_expiry(data["expires_at"]),
    )
    # One statement, one spelling: what was signed is exactly what we re-encode, so no two
    # JSON parsers can read different fields out of it (duplicate keys, escapes, spacing).
    again = canonical_statement(
        plugin=statement.plugin,
        version=statement.version,
        sha256=statement.sha256,
        expires_at=statement.expires_at,
    )
    if again != signed.encode("utf-8"):
        raise ValueError("the signed statement is not in canonical form")
    return statement


def _b64(value: str, *, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SignatureRejected(f"{what} is not valid base64") from None
    if len(raw) != size:
        raise SignatureRejected(f"{what} must be {size} bytes, got {len(raw)}")
    return raw


def verify_payload(
    public_key_b64: str,
    payload: Mapping[str, Any],
    *,
    plugin_name: str,
    now: datetime | None = None,
) -> Statement:
    """What a plugin does with an update or rollback payload before downloading anything:
    the signature must verify with the pinned key over the `signed` bytes; the statement must
    name this plugin and the payload's version and sha256; it must not have expired at `now`
    (default: the current time). Returns the statement; raises SignatureRejected otherwise.

    After downloading, the client checks the artifact with `check_artifact`."""
    fields: dict[str, str] = {}
    for field in ("version", "sha256", "signature", "signed"):
        value = payload.get(field)
        if not isinstance(value, str) or not value:
            raise SignatureRejected(f"payload field {field!r} is missing, empty or not a string")
        fields[field] = value
    key = Ed25519PublicKey.from_public_bytes(
        _b64(public_key_b64, size=32, what="the pinned public key")
    )
    signature = _b64(fields["signature"], size=64, what="the signature")
    try:
        key.verify(signature, fields["signed"].encode("utf-8"))
    except InvalidSignature:
        raise SignatureRejected(
            "the signature does not verify with the pinned public key"
        ) from None
    try:
        statement = parse_statement(fields["signed"])
    except ValueError as exc:
        raise SignatureRejected(str(exc)) from None
    if statement.plugin != plugin_name:
        raise SignatureRejected(
            f"the statement is for plugin {statement.plugin!r}, not {plugin_name!r}"
        )
    if statement.version != fields["version"]:
        raise SignatureRejected(
            f"the payload's version {fields['version']!r} is not the signed version"
            f" {statement.version!r}"
        )
    if statement.sha256 != fields["sha256"]:
        raise SignatureRejected("the payload's sha256 is not the signed sha256")
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if moment >= statement.expires_at:
        raise SignatureRejected(f"the statement expired at {format_expiry(statement.expires_at)}")
    return statement


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks: artifacts may be larger than memory likes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_artifact(statement: Statement, path: Path) -> None:
    """The downloaded artifact must be the signed bytes."""
    actual = sha256_file(path)
    if actual != statement.sha256:
        raise SignatureRejected(
            f"the artifact's sha256 {actual} is not the signed sha256 {statement.sha256}"
        )
