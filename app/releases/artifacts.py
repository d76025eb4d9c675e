"""Artifact URLs for the staging runner: pre-signed capabilities.

Plugins download a release's stored bytes with a signed plugin request. The staging runner is
not a plugin: the worker gives it a URL that carries its own short-lived permission, like an
S3 pre-signed URL:

    {api}/api/plugins/releases/{plugin}/{version}/artifact?expires=<unix s>&token=<hex>

token = HMAC-SHA256(key, "{plugin}\\n{version}\\n{expires}"), the key derived with HKDF from
SELFHEAL_SECRET_KEY (its own purpose label, so it is unrelated to the key that seals plugin
secrets). The URL opens that one artifact until it expires, and nothing else. During a key
rotation, URLs made under a key of SELFHEAL_SECRET_KEY_PREVIOUS still open until they expire."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.releases.repository import served_path

_PURPOSE = b"selfheal artifact urls v1"


def _key(secret_key: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PURPOSE).derive(
        secret_key.encode()
    )


def _token(key: bytes, plugin: str, version: str, expires: int) -> str:
    message = f"{plugin}\n{version}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class ArtifactCapabilities:
    def __init__(self, secret_key: str, previous: tuple[str, ...] = ()) -> None:
        self._key = _key(secret_key)
        self._accepted = (self._key, *(_key(k) for k in previous if k != secret_key))

    def url(self, base_url: str, plugin: str, version: str, *, ttl_s: int) -> str:
        expires = int(time.time()) + ttl_s
        query = urlencode(
            {"expires": expires, "token": _token(self._key, plugin, version, expires)}
        )
        return f"{base_url.rstrip('/')}{served_path(plugin, version)}?{query}"

    def allows(self, plugin: str, version: str, *, expires: str, token: str) -> bool:
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
            return False
        if int(expires) < time.time():
            return False
        return any(
            hmac.compare_digest(_token(key, plugin, version, int(expires)), token.lower())
            for key in self._accepted
        )
