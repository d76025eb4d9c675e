"""Every SQL statement on the ops policy (`ops_policy`, one row, id = 1): the gate's reads and
locks, the kill switch test, the API's read and update. Raw SQL: these run inside the caller's
transaction on the path of every production-changing step, and the locking clauses are the point.

One statement reads the row elsewhere: the heartbeat statement (`INGEST_SQL`,
app/plugins/ingest.py) holds automatic commands back with `KILL_SWITCH_OFF_SQL` below, inside
its own single round trip."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.states import ATTEMPT_IN_FLIGHT_SQL

# One key for every gate evaluation (advisory locks are per database).
_GATE_LOCK_KEY = "selfheal.policy_gate"

# The columns ops set (the API's PUT, the simulator, psql).
POLICY_FIELDS = (
    "autopatch_enabled",
    "autopatch_whitelist",
    "autopatch_max_severity",
    "min_confidence",
    "canary_percent",
    "approvals_required",
    "approval_min_severity",
    "approval_ttl_s",
    "max_concurrent_actions",
    "max_concurrent_actions_per_tenant",
    "cooldown_s",
)
POLICY_COLUMNS = ", ".join((*POLICY_FIELDS, "updated_at", "updated_by"))


def attempt_generation_sql(incident_id: str) -> str:
    """An SQL expression: the attempt generation (`ProposedAction.generation`) of the
    incident whose id is the SQL expression `incident_id`: how many of its attempts ended
    failed, rolled back or successful, or were cancelled after they were executed. An attempt
    in flight, or cancelled before it reached production (the kill switch, the gate holding
    it), does not count: the votes that allowed it still stand for the same action."""
    return (
        "(SELECT count(*) FROM plugin_autopatch_attempts g"
        f" WHERE g.incident_id = {incident_id}"
        "  AND (g.status IN ('success', 'failed', 'rolled_back')"
        "       OR (g.status = 'cancelled' AND g.executed_at IS NOT NULL)))"
    )


# An SQL expression, true while the kill switch is off (autopatch enabled). For statements that
# must test it in their own SQL: the heartbeat statement (INGEST_SQL) holds automatic commands
# back with it. NULL (no row) is not true, so a missing row holds them back too.
KILL_SWITCH_OFF_SQL = "(SELECT p.autopatch_enabled FROM ops_policy p WHERE p.id = 1)"


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """The ops_policy row as the gate read it, with the database clock at that moment."""

    now: datetime
    autopatch_enabled: bool
    autopatch_whitelist: tuple[str, ...]
    autopatch_max_severity: str
    min_confidence: Decimal
    canary_percent: int
    approvals_required: int
    approval_min_severity: str
    approval_ttl_s: int
    max_concurrent_actions: int
    max_concurrent_actions_per_tenant: int
    cooldown_s: int


@dataclass(frozen=True, slots=True)
class ApprovalsRequired:
    """How many votes the policy asks for, with the database clock at that moment."""

    now: datetime
    approvals_required: int


@dataclass(frozen=True, slots=True)
class InFlightCounts:
    fleet: int
    tenant: int


@dataclass(frozen=True, slots=True)
class Voter:
    username: str
    role: str
    disabled: bool


async def read_policy_for_share(session: AsyncSession) -> PolicySnapshot | None:
    """The policy row, share-locked until the caller's transaction ends.

    FOR SHARE makes a concurrent `UPDATE ops_policy ...` (the runbook's kill switch) either commit
    before this read (we wait for it, then see the new row) or wait until our transaction, and
    the command it creates, has committed. None when the row is not there."""
    result = await session.execute(
        text(
            "SELECT now() AS now, autopatch_enabled, autopatch_whitelist, autopatch_max_severity,"
            " min_confidence, canary_percent, approvals_required, approval_min_severity,"
            " approval_ttl_s, max_concurrent_actions, max_concurrent_actions_per_tenant,"
            " cooldown_s"
            " FROM ops_policy WHERE id = 1 FOR SHARE"
        )
    )
    row = result.mappings().one_or_none()
    if row is None:
        return None
    whitelist = row["autopatch_whitelist"]
    return PolicySnapshot(
        now=row["now"],
        autopatch_enabled=row["autopatch_enabled"],
        # The column is a JSON array (a CHECK says so); entries that are not strings name no
        # tenant, since tenant ids are text.
        autopatch_whitelist=tuple(t for t in whitelist if isinstance(t, str)),
        autopatch_max_severity=row["autopatch_max_severity"],
        min_confidence=row["min_confidence"],
        canary_percent=row["canary_percent"],
        approvals_required=row["approvals_required"],
        approval_min_severity=row["approval_min_severity"],
        approval_ttl_s=row["approval_ttl_s"],
        max_concurrent_actions=row["max_concurrent_actions"],
        max_concurrent_actions_per_tenant=row["max_concurrent_actions_per_tenant"],
        cooldown_s=row["cooldown_s"],
    )


async def read_policy(session: AsyncSession) -> Row[Any]:
    """The policy row as ops see it (POLICY_FIELDS and who changed it when). A plain read."""
    row = await session.execute(text(f"SELECT {POLICY_COLUMNS} FROM ops_policy WHERE id = 1"))
    return row.one()


async def update_policy(session: AsyncSession, changes: dict[str, Any]) -> Row[Any]:
    """Set the columns given (keys from POLICY_FIELDS, or updated_by); the row after it. The
    audit trigger records the change under the transaction's actor (`set_actor`)."""
    assignments = []
    params: dict[str, Any] = {}
    for column, value in changes.items():
        if column == "autopatch_whitelist":
            assignments.append(f"{column} = CAST(:{column} AS jsonb)")
            params[column] = orjson.dumps(value).decode()
        else:
            assignments.append(f"{column} = :{column}")
            params[column] = value
    row = await session.execute(
        text(
            f"UPDATE ops_policy SET {', '.join(assignments)} WHERE id = 1 RETURNING {POLICY_COLUMNS}"
        ),
        params,
    )
    return row.one()


async def autopatch_enabled(session: AsyncSession, *, for_share: bool) -> bool | None:
    """The kill switch test: `autopatch_enabled`, None when the row is missing.

    for_share: share-lock the row until the caller's transaction ends, as the gate's read does
    (take the gate's lock first, `serialize_gate_decisions`, so share locks never pile up and
    starve the kill switch)."""
    result = await session.execute(
        text(
            "SELECT autopatch_enabled FROM ops_policy WHERE id = 1"
            + (" FOR SHARE" if for_share else "")
        )
    )
    enabled: bool | None = result.scalar_one_or_none()
    return enabled


async def approvals_required(session: AsyncSession) -> ApprovalsRequired | None:
    """`approvals_required` and the database clock; a plain read (only the gate share-locks the
    policy, see gate.py on why). None when the row is missing."""
    result = await session.execute(
        text("SELECT now() AS now, approvals_required FROM ops_policy WHERE id = 1")
    )
    row = result.one_or_none()
    return ApprovalsRequired(row.now, row.approvals_required) if row else None


async def read_approval_ttl_s(session: AsyncSession) -> int | None:
    result = await session.execute(text("SELECT approval_ttl_s FROM ops_policy WHERE id = 1"))
    value: int | None = result.scalar_one_or_none()
    return value


async def serialize_gate_decisions(session: AsyncSession) -> None:
    """Take the gate's transaction-level advisory lock.

    Two transactions that both count 9 in-flight attempts under a cap of 10 would otherwise both
    go ahead. Holding this lock until commit makes the next evaluation count after the previous
    one's attempt is visible (READ COMMITTED takes a fresh snapshot per statement)."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": _GATE_LOCK_KEY}
    )


async def installation_tenant(session: AsyncSession, installation_id: uuid.UUID) -> str | None:
    result = await session.execute(
        text("SELECT tenant_id FROM merchant_plugins WHERE id = :id"), {"id": installation_id}
    )
    tenant: str | None = result.scalar_one_or_none()
    return tenant


async def count_in_flight_attempts(
    session: AsyncSession, tenant_id: str, *, excluding: uuid.UUID | None
) -> InFlightCounts:
    """Attempts that may still change production, fleet-wide and on the tenant's installations,
    leaving out the attempt being gated (a later step of an attempt is not its own rival)."""
    result = await session.execute(
        text(
            "SELECT count(*) AS fleet, count(*) FILTER (WHERE mp.tenant_id = :tenant) AS tenant"
            " FROM plugin_autopatch_attempts a"
            " LEFT JOIN merchant_plugins mp ON mp.id = a.installation_id"
            f" WHERE a.status IN {ATTEMPT_IN_FLIGHT_SQL}"
            "  AND (CAST(:excluding AS uuid) IS NULL OR a.id <> CAST(:excluding AS uuid))"
        ),
        {"tenant": tenant_id, "excluding": excluding},
    )
    row = result.one()
    return InFlightCounts(fleet=row.fleet, tenant=row.tenant)


async def installation_has_attempt_in_flight(
    session: AsyncSession, installation_id: uuid.UUID, *, excluding: uuid.UUID | None
) -> bool:
    result = await session.execute(
        text(
            "SELECT EXISTS (SELECT 1 FROM plugin_autopatch_attempts a"
            f"  WHERE a.installation_id = :installation AND a.status IN {ATTEMPT_IN_FLIGHT_SQL}"
            "   AND (CAST(:excluding AS uuid) IS NULL OR a.id <> CAST(:excluding AS uuid)))"
        ),
        {"installation": installation_id, "excluding": excluding},
    )
    return bool(result.scalar_one())


async def last_attempt_activity(
    session: AsyncSession, installation_id: uuid.UUID, *, excluding: uuid.UUID | None
) -> datetime | None:
    """When an attempt on this installation last started or ended (the latest of its creation,
    execution, end and rollback), whatever its outcome, leaving out attempts cancelled before
    they were applied."""
    result = await session.execute(
        text(
            "SELECT max(GREATEST(a.created_at, a.executed_at, a.finished_at, a.rolled_back_at))"
            " FROM plugin_autopatch_attempts a"
            " WHERE a.installation_id = :installation"
            # An attempt cancelled before it changed anything is no oscillation.
            "  AND NOT (a.status = 'cancelled' AND a.executed_at IS NULL)"
            "  AND (CAST(:excluding AS uuid) IS NULL OR a.id <> CAST(:excluding AS uuid))"
        ),
        {"installation": installation_id, "excluding": excluding},
    )
    last: datetime | None = result.scalar_one()
    return last


async def count_valid_approvals(
    session: AsyncSession,
    incident_id: uuid.UUID,
    action_key: str,
    *,
    now: datetime,
    requester_username: str | None,
) -> int:
    """Distinct enabled operators or admins, other than the requester, whose unexpired vote is
    for exactly this action."""
    result = await session.execute(
        text(
            "SELECT count(DISTINCT a.user_id) FROM approvals a"
            " JOIN ops_users u ON u.id = a.user_id"
            " WHERE a.incident_id = :incident AND a.action_key = :key"
            "  AND a.expires_at > :now"
            "  AND u.role IN ('operator', 'admin') AND u.disabled_at IS NULL"
            "  AND (CAST(:requester AS text) IS NULL OR u.username <> CAST(:requester AS text))"
        ),
        {"incident": incident_id, "key": action_key, "now": now, "requester": requester_username},
    )
    return int(result.scalar_one())


async def read_voter(session: AsyncSession, user_id: uuid.UUID) -> Voter | None:
    result = await session.execute(
        text(
            "SELECT username, role, disabled_at IS NOT NULL AS disabled FROM ops_users"
            " WHERE id = :id"
        ),
        {"id": user_id},
    )
    row = result.one_or_none()
    return Voter(row.username, row.role, row.disabled) if row else None


async def upsert_approval(
    session: AsyncSession,
    incident_id: uuid.UUID,
    user_id: uuid.UUID,
    action_key: str,
    comment: str | None,
    ttl_s: int,
) -> None:
    """One vote per (incident, user, action). Voting again renews the vote's expiry (so an
    expired approval can be given again) and keeps the first comment unless a new one is given."""
    await session.execute(
        text(
            "INSERT INTO approvals (incident_id, user_id, action_key, comment, expires_at)"
            " VALUES (:incident, :user, :key, :comment, now() + make_interval(secs => :ttl))"
            " ON CONFLICT ON CONSTRAINT uq_approvals_vote DO UPDATE"
            " SET expires_at = GREATEST(approvals.expires_at, EXCLUDED.expires_at),"
            "     comment = coalesce(EXCLUDED.comment, approvals.comment)"
        ),
        {
            "incident": incident_id,
            "user": user_id,
            "key": action_key,
            "comment": comment,
            "ttl": ttl_s,
        },
    )


async def policy_history(session: AsyncSession, *, limit: int) -> list[dict[str, Any]]:
    """The policy row's changes, newest first, as the `ops_policy_audit` trigger recorded them
    in `audit_log` (migration 0002_invariants): the API's and the dashboard's, and SQL typed in
    psql alike. `actor` is the ops user the application named (None for plain SQL),
    `db_user` the database user; `old` and `new` are the whole row before and after."""
    rows = await session.execute(
        text(
            "SELECT id, at, db_user, application_name, actor, action, old, new FROM audit_log"
            " WHERE entity = 'ops_policy' ORDER BY id DESC LIMIT :limit"
        ),
        {"limit": limit},
    )
    return [dict(row._mapping) for row in rows]
