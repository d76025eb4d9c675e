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


async def attempt_facts(session: AsyncSession, attempt_id: uuid.UUID) -> dict[str, Any] | None:
    """One attempt (the columns of the attempts' list) with its installation's tenant and
    plugin and its incident's type; None when no attempt has this id."""
    row = await session.execute(
        text(
            f"SELECT {ATTEMPT_COLUMNS}, m.tenant_id, m.plugin_name, i.type AS incident_type"
            " FROM plugin_autopatch_attempts a"
            " LEFT JOIN merchant_plugins m ON m.id = a.installation_id"
            " LEFT JOIN plugin_incidents i ON i.id = a.incident_id"
            " WHERE a.id = :id"
        ),
        {"id": attempt_id},
    )
    found = row.first()
    return None if found is None else dict(found._mapping)
