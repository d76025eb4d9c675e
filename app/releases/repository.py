"""Every SQL statement on plugin_releases. Raw SQL in the caller's transaction: the healing loop
reads payloads and candidates inside the same transactions that create commands, and
`selfheal release ...` writes here.

A release whose signed statement has expired (or cannot be read) is never handed out: no
payload, no candidate. The plugin would refuse it anyway, and the healing loop should escalate
("no signed release") rather than queue a command bound to fail. `selfheal release add` with
the same artifact signs it again."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote

from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.releases.signing import parse_statement

_COLUMNS = (
    "plugin_name, version, artifact_url, sha256, signature, signed_statement, created_at,"
    " quarantined_at, quarantine_reason"
)
_LEADING_NUMBERS = re.compile(r"^([0-9]+(?:\.[0-9]+)*)(.*)$", re.DOTALL)

VersionKey = tuple[int, tuple[int, ...], int, str]


@dataclass(frozen=True, slots=True)
class ReleaseRow:
    plugin_name: str
    version: str
    artifact_url: str
    sha256: str
    signature: str
    signed_statement: str
    created_at: datetime
    quarantined_at: datetime | None
    quarantine_reason: str | None

    @property
    def expires_at(self) -> datetime | None:
        """When the signature stops being accepted; None when the stored statement cannot be
        read (edited by hand), which makes the release unusable."""
        try:
            return parse_statement(self.signed_statement).expires_at
        except ValueError:
            return None

    def usable_at(self, now: datetime) -> bool:
        expires_at = self.expires_at
        return expires_at is not None and now < expires_at

    def payload(self, base_url: str | None = None) -> dict[str, str]:
        """The update/rollback command payload of docs/contracts.md, exactly these keys. An artifact
        the control plane serves itself is stored as a path (`served_path`); `base_url` (the
        API as plugins reach it) makes it absolute."""
        url = self.artifact_url
        if base_url is not None and url.startswith("/"):
            url = base_url.rstrip("/") + url
        return {
            "version": self.version,
            "artifact_url": url,
            "sha256": self.sha256,
            "signature": self.signature,
            "signed": self.signed_statement,
        }


def version_sort_key(version: str) -> VersionKey:
    """Leading dotted integers compare as numbers (1.10.0 > 1.9.0); a version with a suffix
    ranks below the same numbers without one (1.2.3-rc1 < 1.2.3); versions that do not start
    with a number rank below all others."""
    match = _LEADING_NUMBERS.match(version)
    if match is None:
        return (0, (), 0, version)
    numbers = tuple(int(part) for part in match.group(1).split("."))
    suffix = match.group(2)
    return (1, numbers, 0 if suffix else 1, suffix)


def _row(row: RowMapping) -> ReleaseRow:
    return ReleaseRow(
        plugin_name=row["plugin_name"],
        version=row["version"],
        artifact_url=row["artifact_url"],
        sha256=row["sha256"],
        signature=row["signature"],
        signed_statement=row["signed_statement"],
        created_at=row["created_at"],
        quarantined_at=row["quarantined_at"],
        quarantine_reason=row["quarantine_reason"],
    )


async def insert_release(
    session: AsyncSession,
    *,
    plugin: str,
    version: str,
    artifact_url: str,
    sha256: str,
    signature: str,
    signed_statement: str,
) -> ReleaseRow | None:
    """The new row, or None when (plugin, version) exists already (concurrent adds of the same
    release wait for each other on the unique index instead of failing)."""
    result = await session.execute(
        text(
            "INSERT INTO plugin_releases"
            " (plugin_name, version, artifact_url, sha256, signature, signed_statement)"
            " VALUES (:plugin, :version, :artifact_url, :sha256, :signature, :signed)"
            " ON CONFLICT (plugin_name, version) DO NOTHING"
            f" RETURNING {_COLUMNS}"
        ),
        {
            "plugin": plugin,
            "version": version,
            "artifact_url": artifact_url,
            "sha256": sha256,
            "signature": signature,
            "signed": signed_statement,
        },
    )
    row = result.mappings().one_or_none()
    return None if row is None else _row(row)


async def get_release(
    session: AsyncSession, plugin: str, version: str, *, for_update: bool = False
) -> ReleaseRow | None:
    result = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM plugin_releases"
            " WHERE plugin_name = :plugin AND version = :version"
            + (" FOR UPDATE" if for_update else "")
        ),
        {"plugin": plugin, "version": version},
    )
    row = result.mappings().one_or_none()
    return None if row is None else _row(row)


async def update_release(
    session: AsyncSession,
    *,
    plugin: str,
    version: str,
    artifact_url: str,
    signature: str,
    signed_statement: str,
) -> ReleaseRow:
    """A new signature (renewal, a new key) or a new URL for the same bytes. The sha256 never
    changes: a release is immutable, a different artifact is a different version."""
    result = await session.execute(
        text(
            "UPDATE plugin_releases SET artifact_url = :artifact_url, signature = :signature,"
            " signed_statement = :signed"
            " WHERE plugin_name = :plugin AND version = :version"
            f" RETURNING {_COLUMNS}"
        ),
        {
            "plugin": plugin,
            "version": version,
            "artifact_url": artifact_url,
            "signature": signature,
            "signed": signed_statement,
        },
    )
    return _row(result.mappings().one())


async def command_payload(
    session: AsyncSession, plugin: str, version: str, *, base_url: str | None = None
) -> dict[str, str] | None:
    """`{"version", "artifact_url", "sha256", "signature", "signed"}` for an update or rollback
    command to `version`; None when there is no such release or its signature has expired
    (by the database clock). Quarantine does not hide a payload: an operator may still apply
    a quarantined version by hand; automatic choices consult `quarantined_versions`."""
    result = await session.execute(
        text(
            f"SELECT now() AS db_now, {_COLUMNS} FROM plugin_releases"
            " WHERE plugin_name = :plugin AND version = :version"
        ),
        {"plugin": plugin, "version": version},
    )
    row = result.mappings().one_or_none()
    if row is None:
        return None
    release = _row(row)
    return release.payload(base_url) if release.usable_at(row["db_now"]) else None


async def candidate_versions(
    session: AsyncSession, plugin: str, *, exclude: str | None = None
) -> list[str]:
    """Versions the healing loop may propose: released, signed and not expired, not
    quarantined, not `exclude` (the version the installation runs); newest first."""
    result = await session.execute(
        text(
            f"SELECT now() AS db_now, {_COLUMNS} FROM plugin_releases"
            " WHERE plugin_name = :plugin AND quarantined_at IS NULL"
        ),
        {"plugin": plugin},
    )
    usable = [
        release
        for row in result.mappings()
        if (release := _row(row)).usable_at(row["db_now"]) and release.version != exclude
    ]
    usable.sort(key=lambda r: (version_sort_key(r.version), r.created_at), reverse=True)
    return [release.version for release in usable]


async def quarantined_versions(
    session: AsyncSession, plugin: str, *, tenant_id: str | None = None
) -> frozenset[str]:
    """The plugin's versions no automatic choice may propose: quarantined fleet-wide, and,
    with `tenant_id`, those blocked for that tenant's installations."""
    result = await session.execute(
        text(
            "SELECT version FROM plugin_releases"
            " WHERE plugin_name = :plugin AND quarantined_at IS NOT NULL"
            " UNION SELECT version FROM plugin_release_tenant_blocks"
            " WHERE plugin_name = :plugin AND tenant_id = CAST(:tenant AS text)"
        ),
        {"plugin": plugin, "tenant": tenant_id},
    )
    return frozenset(result.scalars())


async def block_for_tenant(
    session: AsyncSession, plugin: str, version: str, tenant_id: str, reason: str
) -> bool:
    """Block a release for one tenant's installations (automatic choices stop proposing it
    to them; an operator may still apply it by hand). True when this call blocked it; False
    when it was blocked already (the first reason stays) or there is no such release."""
    result = await session.execute(
        text(
            "INSERT INTO plugin_release_tenant_blocks (plugin_name, version, tenant_id, reason)"
            " SELECT plugin_name, version, :tenant, :reason FROM plugin_releases"
            " WHERE plugin_name = :plugin AND version = :version"
            " ON CONFLICT DO NOTHING RETURNING 1"
        ),
        {"plugin": plugin, "version": version, "tenant": tenant_id, "reason": reason},
    )
    return result.first() is not None


async def quarantine(session: AsyncSession, plugin: str, version: str, reason: str) -> bool:
    """Mark a release as not to be applied automatically. True when this call quarantined it;
    False when it was already quarantined (the first reason stays) or does not exist."""
    result = await session.execute(
        text(
            "UPDATE plugin_releases SET quarantined_at = now(), quarantine_reason = :reason"
            " WHERE plugin_name = :plugin AND version = :version AND quarantined_at IS NULL"
            " RETURNING 1"
        ),
        {"plugin": plugin, "version": version, "reason": reason},
    )
    return result.first() is not None


async def unquarantine(session: AsyncSession, plugin: str, version: str) -> bool:
    """Lift a quarantine, and the release's blocks for single tenants. True when this call
    lifted any."""
    blocks = await session.execute(
        text(
            "DELETE FROM plugin_release_tenant_blocks"
            " WHERE plugin_name = :plugin AND version = :version RETURNING 1"
        ),
        {"plugin": plugin, "version": version},
    )
    lifted_blocks = blocks.first() is not None
    result = await session.execute(
        text(
            "UPDATE plugin_releases SET quarantined_at = NULL, quarantine_reason = NULL"
            " WHERE plugin_name = :plugin AND version = :version AND quarantined_at IS NOT NULL"
            " RETURNING 1"
        ),
        {"plugin": plugin, "version": version},
    )
    return result.first() is not None or lifted_blocks


async def list_releases(session: AsyncSession, plugin: str | None = None) -> list[ReleaseRow]:
    """Every release (of `plugin`), by plugin name, then newest version first."""
    result = await session.execute(
        text(
            f"SELECT {_COLUMNS} FROM plugin_releases"
            " WHERE CAST(:plugin AS text) IS NULL OR plugin_name = :plugin"
        ),
        {"plugin": plugin},
    )
    rows = [_row(row) for row in result.mappings()]
    rows.sort(key=lambda r: (version_sort_key(r.version), r.created_at), reverse=True)
    rows.sort(key=lambda r: r.plugin_name)  # stable: versions stay newest first per plugin
    return rows


def served_path(plugin: str, version: str) -> str:
    """Where the control plane serves a release's stored bytes (to signed plugin requests, and
    to the staging runner with a capability URL): the artifact_url of such a release."""
    return f"/api/plugins/releases/{quote(plugin, safe='')}/{quote(version, safe='')}/artifact"


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    sha256: str
    size_bytes: int


async def store_artifact(
    session: AsyncSession, *, plugin: str, version: str, sha256: str, content: bytes
) -> bool:
    """Keep the bytes of a release (the release row must exist). True when stored now; False
    when they were stored before (the CHECK constraint ties sha256 to the bytes, and the
    release's sha256 never changes, so stored bytes are always the release's)."""
    result = await session.execute(
        text(
            "INSERT INTO plugin_release_artifacts (plugin_name, version, sha256, size_bytes,"
            " content) VALUES (:plugin, :version, :sha256, :size, :content)"
            " ON CONFLICT (plugin_name, version) DO NOTHING RETURNING 1"
        ),
        {
            "plugin": plugin,
            "version": version,
            "sha256": sha256,
            "size": len(content),
            "content": content,
        },
    )
    return result.first() is not None


async def stored_artifact(
    session: AsyncSession, plugin: str, version: str
) -> StoredArtifact | None:
    result = await session.execute(
        text(
            "SELECT sha256, size_bytes FROM plugin_release_artifacts"
            " WHERE plugin_name = :plugin AND version = :version"
        ),
        {"plugin": plugin, "version": version},
    )
    row = result.first()
    return None if row is None else StoredArtifact(row.sha256, int(row.size_bytes))


async def artifact_chunk(
    session: AsyncSession, plugin: str, version: str, *, offset: int, size: int
) -> bytes:
    """`size` bytes of the stored artifact from `offset` (0-based): artifacts are streamed in
    chunks, so no process holds a whole large artifact in memory."""
    result = await session.execute(
        text(
            "SELECT substring(content FROM :start FOR :size) FROM plugin_release_artifacts"
            " WHERE plugin_name = :plugin AND version = :version"
        ),
        {"plugin": plugin, "version": version, "start": offset + 1, "size": size},
    )
    chunk = result.scalar_one_or_none()
    return bytes(chunk) if chunk is not None else b""


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    """A release with its quarantine state and how the patches to it went. Rates are
    percentages of the finished patches (success, failed, rolled_back), None without any."""

    plugin_name: str
    version: str
    created_at: datetime
    quarantined_at: datetime | None
    quarantine_reason: str | None
    installations: int  # installations running it now
    patches: int  # patch attempts to it, all statuses
    successes: int  # success and still so (a success rolled back later counts as rolled back)
    rollbacks: int
    failures: int
    in_flight: int
    cancelled: int
    success_rate: float | None
    rollback_rate: float | None


async def release_outcomes(
    session: AsyncSession, plugin: str | None = None, *, tenants: list[str] | None = None
) -> list[ReleaseOutcome]:
    """Every release (of `plugin`), by plugin name then newest version first, with the
    outcomes of the patch attempts to it (`to_version`, on installations of that plugin).
    Rollback attempts to a version are not counted: they say how leaving a bad version went,
    not how this one behaves. `tenants` (a tenant-scoped reader): installations and attempts
    of those tenants only; None: every tenant."""
    result = await session.execute(
        text(
            "SELECT r.plugin_name, r.version, r.created_at, r.quarantined_at,"
            " r.quarantine_reason,"
            " (SELECT count(*) FROM merchant_plugins m WHERE m.plugin_name = r.plugin_name"
            "   AND m.plugin_version = r.version"
            "   AND (CAST(:scope AS text[]) IS NULL OR m.tenant_id = ANY(:scope)))"
            "   AS installations,"
            " count(a.id) AS patches,"
            " count(a.id) FILTER (WHERE a.status = 'success') AS successes,"
            " count(a.id) FILTER (WHERE a.status = 'rolled_back') AS rollbacks,"
            " count(a.id) FILTER (WHERE a.status = 'failed') AS failures,"
            " count(a.id) FILTER (WHERE a.status IN ('pending', 'staging', 'applying',"
            "   'verifying')) AS in_flight,"
            " count(a.id) FILTER (WHERE a.status = 'cancelled') AS cancelled"
            " FROM plugin_releases r"
            " LEFT JOIN (plugin_autopatch_attempts a"
            "   JOIN merchant_plugins am ON am.id = a.installation_id)"
            "  ON a.to_version = r.version AND am.plugin_name = r.plugin_name"
            "  AND a.action = 'patch'"
            "  AND (CAST(:scope AS text[]) IS NULL OR am.tenant_id = ANY(:scope))"
            " WHERE CAST(:plugin AS text) IS NULL OR r.plugin_name = :plugin"
            " GROUP BY r.plugin_name, r.version, r.created_at, r.quarantined_at,"
            "  r.quarantine_reason"
        ),
        {"plugin": plugin, "scope": tenants},
    )
    outcomes = []
    for row in result.mappings():
        finished = row["successes"] + row["rollbacks"] + row["failures"]
        outcomes.append(
            ReleaseOutcome(
                plugin_name=row["plugin_name"],
                version=row["version"],
                created_at=row["created_at"],
                quarantined_at=row["quarantined_at"],
                quarantine_reason=row["quarantine_reason"],
                installations=row["installations"],
                patches=row["patches"],
                successes=row["successes"],
                rollbacks=row["rollbacks"],
                failures=row["failures"],
                in_flight=row["in_flight"],
                cancelled=row["cancelled"],
                success_rate=round(row["successes"] * 100 / finished, 3) if finished else None,
                rollback_rate=round(row["rollbacks"] * 100 / finished, 3) if finished else None,
            )
        )
    outcomes.sort(key=lambda r: (version_sort_key(r.version), r.created_at), reverse=True)
    outcomes.sort(key=lambda r: r.plugin_name)
    return outcomes
