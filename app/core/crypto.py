"""Secrets at rest. Plugin signing secrets must be recoverable (we verify HMACs with them),
so they are encrypted, not hashed: AES-256-GCM under a key derived from SELFHEAL_SECRET_KEY
with HKDF, the installation id bound as associated data so a ciphertext cannot be moved to
another installation's row.

Ciphertexts name the key that sealed them, so that a key rotation (README, Security) can
tell old from new while both are readable:

    version 2: 0x02 | key id (4 bytes) | nonce (12) | AES-GCM(plaintext), the version byte and
               key id bound as associated data too
    version 1: 0x01 | nonce (12) | AES-GCM(plaintext), written before key ids; opened with
               whichever configured key authenticates it

The key id is derived from the key with HKDF (its own purpose label): 32 bits of a one-way
function of a 256-bit secret, enough to tell a handful of keys apart and no help in guessing
one. SELFHEAL_SECRET_KEY seals; it and SELFHEAL_SECRET_KEY_PREVIOUS open."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.settings import Settings, secret_key_problem

_LEGACY = b"\x01"
_VERSION = b"\x02"
KEY_ID_BYTES = 4
_NONCE_BYTES = 12
_KEY_ID_PURPOSE = b"selfheal key id v1"


class WeakSecretKey(ValueError):
    """SELFHEAL_SECRET_KEY is missing, public or short; the message says what to do."""


class UnreadableSecret(ValueError):
    """No configured key opens this ciphertext (another key sealed it, or it is damaged)."""


def key_id(secret_key: str) -> bytes:
    """The id that ciphertexts sealed under `secret_key` carry."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_ID_BYTES, salt=None, info=_KEY_ID_PURPOSE
    ).derive(secret_key.encode())


@dataclass(frozen=True, slots=True)
class _Key:
    id: bytes
    aead: AESGCM


def _key(secret_key: str, purpose: bytes) -> _Key:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
        secret_key.encode()
    )
    return _Key(key_id(secret_key), AESGCM(derived))


class SecretBox:
    """Seals under `secret_key` (refused when weak: WeakSecretKey); opens what it or one of
    the `previous` keys sealed (those may be weak: a rotation away from a weak key needs it
    readable until every secret is sealed again)."""

    def __init__(
        self,
        secret_key: str,
        *,
        previous: Sequence[str] = (),
        purpose: bytes = b"selfheal plugin secrets v1",
    ) -> None:
        problem = secret_key_problem(secret_key)
        if problem is not None:
            raise WeakSecretKey(problem)
        self._current = _key(secret_key, purpose)
        olds = dict.fromkeys(k for k in previous if k and k != secret_key)
        self._keys = (self._current, *(_key(k, purpose) for k in olds))

    @classmethod
    def for_settings(cls, settings: Settings) -> SecretBox:
        return cls(settings.secret_key, previous=settings.previous_secret_keys)

    @property
    def key_id(self) -> bytes:
        """The id of the key this box seals with."""
        return self._current.id

    @property
    def prefix(self) -> bytes:
        """What every ciphertext this box seals starts with (version and key id)."""
        return _VERSION + self._current.id

    def seal(self, plaintext: str, *, bound_to: str) -> bytes:
        header = self.prefix
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._current.aead.encrypt(nonce, plaintext.encode(), header + bound_to.encode())
        return header + nonce + sealed

    def open(self, sealed: bytes, *, bound_to: str) -> str:
        if sealed[:1] == _VERSION:
            header = sealed[: 1 + KEY_ID_BYTES]
            body = sealed[len(header) :]
            keys = [k for k in self._keys if k.id == header[1:]]
            if not keys:
                raise UnreadableSecret(
                    f"sealed under key id {header[1:].hex()}, which is neither"
                    " SELFHEAL_SECRET_KEY nor one of SELFHEAL_SECRET_KEY_PREVIOUS"
                )
            associated = header + bound_to.encode()
        elif sealed[:1] == _LEGACY:
            body, keys, associated = sealed[1:], list(self._keys), bound_to.encode()
        else:
            raise UnreadableSecret("unknown secret encoding")
        nonce, ciphertext = body[:_NONCE_BYTES], body[_NONCE_BYTES:]
        for key in keys:
            try:
                return key.aead.decrypt(nonce, ciphertext, associated).decode()
            except InvalidTag:
                continue
        raise UnreadableSecret(
            "no configured key opens it (another key sealed it, or it is damaged)"
        )

    def is_current(self, sealed: bytes) -> bool:
        """Whether `sealed` is already sealed under this box's key (nothing to rotate)."""
        return sealed.startswith(self.prefix)

    def reseal(self, sealed: bytes, *, bound_to: str) -> bytes:
        """`sealed` opened (with any configured key) and sealed again under the current key."""
        return self.seal(self.open(sealed, bound_to=bound_to), bound_to=bound_to)


def new_plugin_secret() -> str:
    return "shs_" + secrets.token_urlsafe(32)


def new_api_token() -> str:
    return "sht_" + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
