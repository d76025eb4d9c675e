"""Adding releases: hash the artifact, sign the statement once, store it. Reads and quarantine
are the repository's functions, re-exported here so callers need one import."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncSession

from app.core import names
from app.core.errors import Conflict, Invalid
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
DEFAULT_MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
_MAX_URL = 2048


class ReleaseConflict(Conflict):
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
    installations that will run it. Invalid names the option."""
    names.check(("plugin", plugin, names.PLUGIN), ("version", version, names.VERSION))


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or len(url) > _MAX_URL
        or any(ch.isspace() or ord(ch) < 32 for ch in url)
    ):
        raise Invalid(
            f"--url {url!r} is not an http(s) URL (plugins download only over http or https;"
            f" at most {_MAX_URL} characters)"
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
    max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
) -> AddedRelease:
    """Record `artifact` as `plugin` `version`, signed by `signer` until `valid_days` from now.

    The artifact is hashed here (streamed, off the event loop) so the sha256 is of the bytes
    the release manager has in hand, not of whatever a URL serves later. The bytes are kept in
    PostgreSQL (up to `max_bytes`, SELFHEAL_ARTIFACT_MAX_BYTES) and served by every API
    process to signed plugin requests; that is the default URL. `url` (http or https) names
    another place plugins download from instead; it is required for larger artifacts.

    Adding the same (plugin, version) again is idempotent when the bytes are the same: the row
    is left alone while its signature is valid for this key and not expired; it is signed
    again when it has expired, was signed by another key, or `renew` asks; an explicit `url`
    replaces the stored one. Different bytes under an existing version raise ReleaseConflict:
    plugins may already have verified and installed the first artifact."""
    check_release(plugin, version)
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise Invalid(f"--valid-days must be between 1 and {MAX_VALID_DAYS}")
    if url is not None:
        _check_url(url)
    sha256, content = await asyncio.to_thread(_read_artifact, artifact, max_bytes, url)
    default_url = repository.served_path(plugin, version) if content is not None else None
    moment = datetime.now(UTC) if now is None else now
    expires_at = (moment + timedelta(days=valid_days)).replace(microsecond=0)
    signed, signature = sign_statement(
        signer, plugin=plugin, version=version, sha256=sha256, expires_at=expires_at
    )
    inserted = await repository.insert_release(
        session,
        plugin=plugin,
        version=version,
        artifact_url=url or default_url or "",
        sha256=sha256,
        signature=signature,
        signed_statement=signed,
    )
    if inserted is not None:
        if content is not None:
            await repository.store_artifact(
                session, plugin=plugin, version=version, sha256=sha256, content=content
            )
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
    stored_now = content is not None and await repository.store_artifact(
        session, plugin=plugin, version=version, sha256=sha256, content=content
    )
    resign = renew or not _valid_for(existing, signer, moment)
    wanted_url = url
    if wanted_url is None and not existing.artifact_url.startswith(("http://", "https://", "/")):
        # Recorded before the control plane kept artifacts (a file:// URI plugins cannot use):
        # now that the bytes are stored, serve them.
        wanted_url = default_url
    new_url = wanted_url is not None and wanted_url != existing.artifact_url
    if not (resign or new_url):
        return AddedRelease(existing, "updated" if stored_now else "unchanged")
    updated = await repository.update_release(
        session,
        plugin=plugin,
        version=version,
        artifact_url=wanted_url if wanted_url is not None else existing.artifact_url,
        signature=signature if resign else existing.signature,
        signed_statement=signed if resign else existing.signed_statement,
    )
    return AddedRelease(updated, "updated")


def _read_artifact(artifact: Path, max_bytes: int, url: str | None) -> tuple[str, bytes | None]:
    """(sha256, the bytes to keep, or None when the artifact is served from `url` because it is
    too large to keep); file system work, run in a thread."""
    if not artifact.is_file():
        raise Invalid(f"--artifact {artifact}: no such file")
    size = artifact.stat().st_size
    if size > max_bytes:
        if url is None:
            raise Invalid(
                f"--artifact {artifact} is {size} bytes, more than the control plane keeps"
                f" (SELFHEAL_ARTIFACT_MAX_BYTES={max_bytes}): serve it elsewhere and pass --url"
            )
        return sha256_file(artifact), None
    content = artifact.read_bytes()
    return hashlib.sha256(content).hexdigest(), content


def _valid_for(release: ReleaseRow, signer: Signer, now: datetime) -> bool:
    """Would a plugin pinning this signer's public key accept the stored payload now?"""
    try:
        verify_payload(
            signer.public_key_b64, release.payload(), plugin_name=release.plugin_name, now=now
        )
    except SignatureRejected:
        return False
    return True
