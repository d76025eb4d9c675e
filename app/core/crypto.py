"""Secrets at rest. Plugin signing secrets must be recoverable (we verify HMACs with them),
so they are encrypted, not hashed: AES-256-GCM under a key derived from SELFHEAL_SECRET_KEY
with HKDF, the installation id bound as associated data so a ciphertext cannot be moved to
another installation's row."""

from __future__ import annotations

import hashlib
import os
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = b"\x01"


class SecretBox:
    def __init__(self, secret_key: str, *, purpose: bytes = b"selfheal plugin secrets v1") -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
            secret_key.encode()
        )
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, *, bound_to: str) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext.encode(), bound_to.encode())

    def open(self, sealed: bytes, *, bound_to: str) -> str:
        if sealed[:1] != _VERSION:
            raise ValueError("unknown secret encoding")
        nonce, ciphertext = sealed[1:13], sealed[13:]
        return self._aead.decrypt(nonce, ciphertext, bound_to.encode()).decode()


def new_plugin_secret() -> str:
    return "shs_" + secrets.token_urlsafe(32)


def new_api_token() -> str:
    return "sht_" + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
