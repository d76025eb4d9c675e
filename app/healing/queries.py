"""Read side of the loop's record: an attempt's proof, i.e. its event log
(`plugin_autopatch_attempt_events`, written by a trigger, append-only, one hash chain for all
attempts; migration 0002_invariants) and whether that chain verifies. Every statement here
only reads. The attempts' list stays with the incidents' reads (app/incidents/queries.py);
this is the part about the record itself, next to the code that writes the attempts."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.incidents.queries import ATTEMPT_COLUMNS

# The chain's first link: migration 0002's selfheal_append_attempt_event starts from it.
GENESIS = b"\x00" * 32


class AttemptEvent(BaseModel):
    id: int  # the position in the one chain shared by every attempt
    at: datetime
    operation: str  # insert or update
    old_status: str | None  # None on the insert
    new_status: str
    actor: str | None  # the ops user the application named (selfheal.actor); None: plain SQL
    db_user: str  # the database user that made the change
    application_name: str | None
    prev_hash: str  # hex
    hash: str  # hex
    # The stored hash is the hash of this event's stored fields (recomputed by the
    # migration's selfheal_attempt_event_hash): the event was not edited.
    hash_matches: bool
    # prev_hash is the hash of the event just before it in the chain (GENESIS for the first):
    # nothing was removed or inserted before it.
    linked: bool


class AttemptProof(BaseModel):
    attempt_id: uuid.UUID
    events: list[AttemptEvent]  # oldest first
    # selfheal_verify_attempt_events(): the id of the first event of the whole chain whose
    # link or hash does not match, None when the whole chain verifies.
    first_broken_event_id: int | None
    # The whole chain verifies.
    chain_verified: bool
    # The chain verifies from its start through this attempt's last event: every event of
    # this attempt is proven (the chain may be broken later, by another attempt's events).
    verified: bool


async def attempt_proof(session: AsyncSession, attempt_id: uuid.UUID) -> AttemptProof | None:
    """The attempt's event log and whether its chain verifies; None when no attempt has this
    id. `selfheal_verify_attempt_events()` walks the whole chain (one pass over every event of
    every attempt), the only way to prove the links up to this attempt's events: fine for a
    page about one attempt, not for a list."""
    exists = await session.execute(
        text("SELECT 1 FROM plugin_autopatch_attempts WHERE id = :id"), {"id": attempt_id}
    )
    if exists.first() is None:
        return None
    rows = await session.execute(
        text(
            "SELECT e.id, e.at, e.operation, e.old_status, e.new_status, e.actor, e.db_user,"
            " e.application_name, e.prev_hash, e.hash,"
            " e.hash = selfheal_attempt_event_hash(e.prev_hash, e.id, e.attempt_id, e.at,"
            "   e.operation, e.old_status, e.new_status, e.db_user, e.application_name,"
            "   e.actor, e.row_data) AS hash_matches,"
            " e.prev_hash = coalesce((SELECT p.hash FROM plugin_autopatch_attempt_events p"
            "   WHERE p.id < e.id ORDER BY p.id DESC LIMIT 1), :genesis) AS linked"
            " FROM plugin_autopatch_attempt_events e"
            " WHERE e.attempt_id = :id ORDER BY e.id"
        ),
        {"id": attempt_id, "genesis": GENESIS},
    )
    events = [
        AttemptEvent(
            id=row.id,
            at=row.at,
            operation=row.operation,
            old_status=row.old_status,
            new_status=row.new_status,
            actor=row.actor,
            db_user=row.db_user,
            application_name=row.application_name,
            prev_hash=bytes(row.prev_hash).hex(),
            hash=bytes(row.hash).hex(),
            hash_matches=bool(row.hash_matches),
            linked=bool(row.linked),
        )
        for row in rows
    ]
    broken: int | None = (
        await session.execute(text("SELECT selfheal_verify_attempt_events()"))
    ).scalar_one()
    last = events[-1].id if events else None
    return AttemptProof(
        attempt_id=attempt_id,
        events=events,
        first_broken_event_id=broken,
        chain_verified=broken is None,
        # An attempt always has its insert event; none at all means the log lost it.
        verified=last is not None and (broken is None or broken > last),
    )


async def attempt_facts(
    session: AsyncSession, attempt_id: uuid.UUID, *, tenants: list[str] | None = None
) -> dict[str, Any] | None:
    """One attempt (the columns of the attempts' list) with its installation's tenant and
    plugin and its incident's type; None when no attempt has this id on an installation of
    `tenants` (the reader's scope; None: every tenant)."""
    row = await session.execute(
        text(
            f"SELECT {ATTEMPT_COLUMNS}, m.tenant_id, m.plugin_name, i.type AS incident_type"
            " FROM plugin_autopatch_attempts a"
            " LEFT JOIN merchant_plugins m ON m.id = a.installation_id"
            " LEFT JOIN plugin_incidents i ON i.id = a.incident_id"
            " WHERE a.id = :id"
            "  AND (CAST(:scope AS text[]) IS NULL OR m.tenant_id = ANY(:scope))"
        ),
        {"id": attempt_id, "scope": tenants},
    )
    found = row.first()
    return None if found is None else dict(found._mapping)


class AttemptCommand(BaseModel):
    """One command queued for the plugin on an attempt's behalf (plugin_agent_commands)."""

    id: uuid.UUID
    type: str  # update, rollback or config
    version: str | None  # the payload's version, when it names one
    status: str  # pending, delivered, acked, failed, expired or cancelled
    created_at: datetime
    delivered_at: datetime | None
    acked_at: datetime | None
    failed_at: datetime | None
    expires_at: datetime  # when status is expired, the time it expired
    error: str | None
    delivery_count: int


class AttemptProgress(BaseModel):
    """What an attempt went through after the decision: staging, commands, verification."""

    attempt_id: uuid.UUID
    status: str
    staging_report: dict[str, Any] | None
    verify_deadline_at: datetime | None
    finished_at: datetime | None
    failure_reason: str | None
    rollback_reason: str | None
    commands: list[AttemptCommand]  # oldest first

    @property
    def staging_status(self) -> str | None:
        report = self.staging_report or {}
        status = report.get("status")
        return None if status is None else str(status)

    @property
    def staging_summary(self) -> str | None:
        """The report's own words: its summary or detail, or why staging was skipped."""
        report = self.staging_report or {}
        inner = report.get("report")
        for value in (
            report.get("summary"),
            report.get("detail"),
            report.get("skipped"),
            inner.get("summary") if isinstance(inner, dict) else None,
        ):
            if value:
                return str(value)
        return None


async def attempts_progress(
    session: AsyncSession, incident_id: uuid.UUID
) -> dict[uuid.UUID, AttemptProgress]:
    """The incident's attempts' staging reports, verification deadlines and commands, by
    attempt id (empty when it has none)."""
    attempts = await session.execute(
        text(
            "SELECT id, status, staging_report, verify_deadline_at, finished_at,"
            " failure_reason, rollback_reason"
            " FROM plugin_autopatch_attempts WHERE incident_id = :id ORDER BY created_at, id"
        ),
        {"id": incident_id},
    )
    found = {
        row.id: AttemptProgress(
            attempt_id=row.id,
            status=row.status,
            staging_report=row.staging_report,
            verify_deadline_at=row.verify_deadline_at,
            finished_at=row.finished_at,
            failure_reason=row.failure_reason,
            rollback_reason=row.rollback_reason,
            commands=[],
        )
        for row in attempts
    }
    if not found:
        return found
    commands = await session.execute(
        text(
            "SELECT id, attempt_id, type, payload->>'version' AS version, status, created_at,"
            " delivered_at, acked_at, failed_at, expires_at, error, delivery_count"
            " FROM plugin_agent_commands WHERE attempt_id = ANY(:ids)"
            " ORDER BY created_at, id"
        ),
        {"ids": list(found)},
    )
    for row in commands:
        found[row.attempt_id].commands.append(
            AttemptCommand(
                id=row.id,
                type=row.type,
                version=row.version,
                status=row.status,
                created_at=row.created_at,
                delivered_at=row.delivered_at,
                acked_at=row.acked_at,
                failed_at=row.failed_at,
                expires_at=row.expires_at,
                error=row.error,
                delivery_count=row.delivery_count,
            )
        )
    return found


async def verify_deadlines(
    session: AsyncSession, incident_ids: list[uuid.UUID]
) -> dict[uuid.UUID, datetime]:
    """For each of these incidents with an attempt being verified, its verification
    deadline (the latest such attempt's); one statement for a page of incidents."""
    if not incident_ids:
        return {}
    rows = await session.execute(
        text(
            "SELECT DISTINCT ON (incident_id) incident_id, verify_deadline_at"
            " FROM plugin_autopatch_attempts"
            " WHERE incident_id = ANY(:ids) AND verify_deadline_at IS NOT NULL"
            "  AND status = 'verifying'"
            " ORDER BY incident_id, created_at DESC"
        ),
        {"ids": incident_ids},
    )
    return {row.incident_id: row.verify_deadline_at for row in rows}
