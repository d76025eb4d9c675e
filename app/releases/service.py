"""Adding releases: hash the artifact, sign the statement once, store it. Reads and quarantine
are the repository's functions, re-exported here so callers need one import."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncSession

from app.plugins.service import _PLUGIN, _VERSION
from app.releases import repository
from app.releases.repository import (
    ReleaseRow,
    candidate_versions,
    command_payload,
    list_releases,
    quarantine,
    quarantined_versions,
    unquarantine,
)
from app.releases.signing import (
    SignatureRejected,
    Signer,
    sha256_file,
    sign_statement,
    verify_payload,
)

__all__ = [
    "MAX_VALID_DAYS",
    "AddedRelease",
    "ReleaseConflict",
    "ReleaseRow",
    "add_release",
    "candidate_versions",
    "check_release",
    "command_payload",
    "list_releases",
    "quarantine",
    "quarantined_versions",
    "unquarantine",
]

MAX_VALID_DAYS = 3650
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_MAX_URL = 2048


class ReleaseConflict(ValueError):
    """(plugin, version) is already released with different bytes."""


@dataclass(frozen=True, slots=True)
class AddedRelease:
    release: ReleaseRow
    # added: a new row. unchanged: the same artifact, still validly signed by this key.
    # updated: the same artifact, signed again (expired, another key, or `renew`) and/or a
    # new URL.
    outcome: Literal["added", "unchanged", "updated"]


def check_release(plugin: str, version: str) -> None:
    """The plugin name and version rules of registration: a release must be nameable by the
    installations that will run it. ValueError names the option."""
    for label, value, pattern in (("plugin", plugin, _PLUGIN), ("version", version, _VERSION)):
        if not pattern.match(value):
            raise ValueError(f"--{label} {value!r} is not valid (expected {pattern.pattern})")


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if (
        not _SCHEME.match(parts.scheme)
        or not (parts.netloc or parts.path)
        or len(url) > _MAX_URL
        or any(ch.isspace() or ord(ch) < 32 for ch in url)
    ):
        raise ValueError(
            f"--url {url!r} is not a URL (expected scheme://..., at most {_MAX_URL} characters)"
        )


async def add_release(
    session: AsyncSession,
    signer: Signer,
    *,
    plugin: str,
    version: str,
    artifact: Path,
    url: str | None = None,
    valid_days: int = 365,
    renew: bool = False,
    now: datetime | None = None,
) -> AddedRelease:
    """Record `artifact` as `plugin` `version`, signed by `signer` until `valid_days` from now.

    The artifact is hashed here (streamed, off the event loop) so the sha256 is of the bytes
    the release manager has in hand, not of whatever a URL serves later. The default URL is
    the file's absolute `file://` URI (for single-machine setups and tests).

    Adding the same (plugin, version) again is idempotent when the bytes are the same: the row
    is left alone while its signature is valid for this key and not expired; it is signed
    again when it has expired, was signed by another key, or `renew` asks; an explicit `url`
    replaces the stored one. Different bytes under an existing version raise ReleaseConflict:
    plugins may already have verified and installed the first artifact."""
    check_release(plugin, version)
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise ValueError(f"--valid-days must be between 1 and {MAX_VALID_DAYS}")
    if url is not None:
        _check_url(url)
    sha256, file_uri = await asyncio.to_thread(_hash_artifact, artifact)
    moment = datetime.now(UTC) if now is None else now
    expires_at = (moment + timedelta(days=valid_days)).replace(microsecond=0)
    signed, signature = sign_statement(
        signer, plugin=plugin, version=version, sha256=sha256, expires_at=expires_at
    )
    inserted = await repository.insert_release(
        session,
        plugin=plugin,
        version=version,
        artifact_url=url if url is not None else file_uri,
        sha256=sha256,
        signature=signature,
        signed_statement=signed,
    )
    if inserted is not None:
        return AddedRelease(inserted, "added")

    existing = await repository.get_release(session, plugin, version, for_update=True)
    if existing is None:  # deleted between the two statements: rare, and worth a retry
        raise ReleaseConflict(f"{plugin} {version} changed concurrently; run the command again")
    if existing.sha256 != sha256:
        raise ReleaseConflict(
            f"{plugin} {version} is already released with sha256 {existing.sha256}, and"
            f" {artifact} has sha256 {sha256}. A released version never changes bytes"
            " (plugins may have installed it): release the new artifact as a new version"
        )
    resign = renew or not _valid_for(existing, signer, moment)
    new_url = url is not None and url != existing.artifact_url
    if not (resign or new_url):
        return AddedRelease(existing, "unchanged")
    updated = await repository.update_release(
        session,
        plugin=plugin,
        version=version,
        artifact_url=url if url is not None else existing.artifact_url,
        signature=signature if resign else existing.signature,
        signed_statement=signed if resign else existing.signed_statement,
    )
    return AddedRelease(updated, "updated")


def _hash_artifact(artifact: Path) -> tuple[str, str]:
    """(sha256, absolute file:// URI); file system work, run in a thread."""
    if not artifact.is_file():
        raise ValueError(f"--artifact {artifact}: no such file")
    return sha256_file(artifact), artifact.resolve().as_uri()


def _valid_for(release: ReleaseRow, signer: Signer, now: datetime) -> bool:
    """Would a plugin pinning this signer's public key accept the stored payload now?"""
    try:
        verify_payload(
            signer.public_key_b64, release.payload(), plugin_name=release.plugin_name, now=now
        )
    except SignatureRejected:
        return False
    return True
