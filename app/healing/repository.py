"""SQL of the healing loop. Every change of an incident or an attempt is guarded by the
status the caller expects (`... WHERE status = :expected`): when two workers race, or a
worker resumes one that died, exactly one UPDATE matches and the other learns it lost by
getting no row back.

Every statement of the healing loop (incidents, attempts, its commands' locks and expiry,
outcomes) sits together so that the guarded-update pattern above is applied and reviewed in
one place; the commands themselves are queued by `insert_command` (app/plugins/repository.py),
the command queue's one home.

Over 600 lines: the loop's reads that weigh history (outcome statistics and rollback tallies
weighed by tenant, the versions failed on an installation) share the definition of "the
version an attempt failed on" with the guarded writes above; split apart, that definition
would have two homes."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.partitions import SIGNED_AT_SLACK_SQL
from app.core.states import (
    ATTEMPT_IN_FLIGHT_SQL,
    INCIDENT_CLOSED,
    INCIDENT_CLOSED_SQL,
    INCIDENT_OPEN,
    IncidentStatus,
)
from app.decisions.schemas import OutcomeStats
from app.healing.pending import PendingAction
from app.incidents.repository import ROLLBACK_TARGET_SQL
from app.policy.repository import (
    attempt_generation_sql,
    autopatch_enabled,
    serialize_gate_decisions,
)


class Keep(enum.Enum):
    """move_incident's "leave this column as it is" (None means: set it to NULL)."""

    KEEP = "keep"


KEEP = Keep.KEEP

# Incident statuses the loop moves on by itself. `escalated` is open but waits for a human.
LOOP_STATUSES = tuple(s for s in INCIDENT_OPEN if s != IncidentStatus.ESCALATED)


@dataclass(frozen=True, slots=True)
class CommandRow:
    id: uuid.UUID
    type: str
    status: str
    automatic: bool
    expires_at: datetime
    lease_expires_at: datetime | None
    delivery_count: int
    max_deliveries: int
    acked_at: datetime | None
    error: str | None
    version: str | None = None  # the version the command takes the plugin to
    # The plugin had it when the kill switch was engaged: never handed out again (0018).
    held_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AttemptRow:
    id: uuid.UUID
    action: str
    from_version: str | None
    to_version: str | None
    status: str
    automatic: bool
    decision_source: str | None
    confidence: Decimal | None
    requested_by: str | None
    created_at: datetime
    executed_at: datetime | None
    staging_run_id: str | None
    staging_report: dict[str, Any] | None
    staging_tries: int
    verify_deadline_at: datetime | None
    rollback_reason: str | None
    failure_reason: str | None

    @property
    def staging_passed(self) -> bool:
        return bool(self.staging_report) and (self.staging_report or {}).get("status") == "passed"


@dataclass(frozen=True, slots=True)
class IncidentState:
    now: datetime
    id: uuid.UUID
    installation_id: uuid.UUID | None
    tenant_id: str | None
    plugin_name: str
    plugin_version: str | None
    type: str
    severity: str
    status: str
    status_reason: str | None
    detected_at: datetime
    telemetry_snapshot: dict[str, Any]
    sira_decision: dict[str, Any] | None
    pending_action: PendingAction | None
    # The installation as it is now.
    current_version: str | None
    # The version to go back to: known-good, else the one before, never one that just failed
    # there (app/incidents/repository.py, ROLLBACK_TARGET_SQL).
    previous_version: str | None
    # The last version healthy here for a whole health window: a rollback to it skips staging.
    known_good_version: str | None
    version_changed_at: datetime | None
    # The incident's attempt generation (app/policy/gate.py, ProposedAction.generation).
    attempt_generation: int
    attempt: AttemptRow | None
    commands: dict[str, CommandRow]
    # Muted (the loop leaves it alone while its installation is silent): since when.
    muted_at: datetime | None = None
    # The installation's heartbeat_missed incident is open (this incident being another one).
    installation_silent: bool = False

    def as_notification(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "type": self.type,
            "severity": self.severity,
            "status": self.status,
            "status_reason": self.status_reason,
            "tenant_id": self.tenant_id,
            "installation_id": str(self.installation_id) if self.installation_id else None,
            "plugin_name": self.plugin_name,
            "plugin_version": self.plugin_version,
            "detected_at": self.detected_at.isoformat(),
        }


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


async def claim_due(
    session: AsyncSession, *, lease_s: int, limit: int
) -> list[tuple[uuid.UUID, bool]]:
    """Incidents the loop should look at now, leased for `lease_s` seconds: due ones
    (next_check_at passed, including those whose worker died and whose lease ran out) and
    new ones (detected, never looked at; flagged True). SKIP LOCKED: concurrent claimers split
    the work. Oldest first, a new incident being due since its detection: under a burst of
    more than `limit`, every incident waits its turn (first come, first served), however many
    others keep coming due."""
    rows = await session.execute(
        text(
            """
            WITH due AS (
                SELECT id, next_check_at IS NULL AS fresh FROM plugin_incidents
                WHERE id IN (
                    (SELECT id FROM plugin_incidents
                     WHERE next_check_at <= now() AND status = ANY(:statuses)
                     ORDER BY next_check_at LIMIT :limit)
                    UNION ALL
                    (SELECT id FROM plugin_incidents
                     WHERE status = 'detected' AND next_check_at IS NULL
                     ORDER BY detected_at LIMIT :limit))
                ORDER BY coalesce(next_check_at, detected_at)
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            )
            UPDATE plugin_incidents i SET next_check_at = now() + make_interval(secs => :lease)
            FROM due WHERE i.id = due.id
            RETURNING i.id, due.fresh
            """
        ),
        {"lease": lease_s, "limit": limit, "statuses": list(LOOP_STATUSES)},
    )
    return [(row.id, bool(row.fresh)) for row in rows]


async def notification_fields(session: AsyncSession, ids: list[uuid.UUID]) -> list[dict[str, Any]]:
    rows = await session.execute(
        text(
            "SELECT id, type, severity, status, status_reason, tenant_id, installation_id,"
            " plugin_name, plugin_version, detected_at FROM plugin_incidents WHERE id = ANY(:ids)"
        ),
        {"ids": ids},
    )
    return [dict(row) for row in rows.mappings()]


async def load_state(session: AsyncSession, incident_id: uuid.UUID) -> IncidentState | None:
    row = (
        (
            await session.execute(
                text(
                    f"""
                    SELECT now() AS now, i.id, i.installation_id, i.tenant_id, i.plugin_name,
                           i.plugin_version, i.type, i.severity, i.status, i.status_reason,
                           i.detected_at, i.telemetry_snapshot, i.sira_decision,
                           i.pending_action, m.plugin_version AS current_version,
                           {ROLLBACK_TARGET_SQL} AS previous_version,
                           m.known_good_version, m.version_changed_at,
                           {attempt_generation_sql("i.id")} AS attempt_generation,
                           i.muted_at,
                           (i.type <> 'heartbeat_missed' AND EXISTS (
                                SELECT 1 FROM plugin_incidents x
                                WHERE x.installation_id = i.installation_id
                                  AND x.type = 'heartbeat_missed'
                                  AND x.status NOT IN {INCIDENT_CLOSED_SQL}))
                               AS installation_silent
                    FROM plugin_incidents i
                    LEFT JOIN merchant_plugins m ON m.id = i.installation_id
                    WHERE i.id = :id
                    """
                ),
                {"id": incident_id},
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        return None
    attempt_row = (
        (
            await session.execute(
                text(
                    f"""
                    SELECT id, action, from_version, to_version, status, automatic,
                           decision_source, confidence, requested_by, created_at, executed_at,
                           staging_run_id, staging_report, staging_tries, verify_deadline_at,
                           rollback_reason, failure_reason
                    FROM plugin_autopatch_attempts WHERE incident_id = :id
                    ORDER BY (status IN {ATTEMPT_IN_FLIGHT_SQL}) DESC,
                             created_at DESC
                    LIMIT 1
                    """
                ),
                {"id": incident_id},
            )
        )
        .mappings()
        .first()
    )
    attempt = AttemptRow(**attempt_row) if attempt_row else None
    commands: dict[str, CommandRow] = {}
    if attempt is not None:
        for command in (
            await session.execute(
                text(
                    "SELECT id, type, status, automatic, expires_at, lease_expires_at,"
                    " delivery_count, max_deliveries, acked_at, error, payload->>'version' AS version,"
                    " held_at"
                    " FROM plugin_agent_commands WHERE attempt_id = :id"
                ),
                {"id": attempt.id},
            )
        ).mappings():
            commands[command["type"]] = CommandRow(**command)
    pending = row["pending_action"]
    return IncidentState(
        **{**row, "pending_action": None if pending is None else PendingAction.from_json(pending)},
        attempt=attempt,
        commands=commands,
    )


async def move_incident(
    session: AsyncSession,
    incident_id: uuid.UUID,
    *,
    expected: str | tuple[str, ...],
    status: str | None = None,
    reason: str | None = None,
    next_check_in_s: float | None = None,
    sira_decision: dict[str, Any] | None = None,
    decided: bool = False,
    pending_action: PendingAction | Keep | None = KEEP,
    severity: str | None = None,
    muted: bool | None = None,
) -> bool:
    """Guarded change of one incident; False when it is no longer in `expected`.

    next_check_in_s: when the loop should look again (None: never, the incident is closed or
    waits for a human). Closing statuses also set resolved_at. sira_decision, severity: set
    when given; decided: stamp decided_at; pending_action: set (None clears it) unless KEEP;
    muted: True marks the incident muted (keeping the first moment), False clears it."""
    expected_tuple = (expected,) if isinstance(expected, str) else expected
    sets = ["updated_at = now()"]
    params: dict[str, Any] = {"id": incident_id, "expected": list(expected_tuple)}
    if status is not None:
        sets.append("status = :status")
        params["status"] = status
        if status in INCIDENT_CLOSED:
            sets.append("resolved_at = coalesce(resolved_at, clock_timestamp())")
        if status == "escalated":
            sets.append("escalated_at = coalesce(escalated_at, clock_timestamp())")
    if reason is not None:
        sets.append("status_reason = :reason")
        params["reason"] = reason[:2000]
    if next_check_in_s is None:
        sets.append("next_check_at = NULL")
    else:
        sets.append("next_check_at = now() + make_interval(secs => :next_in)")
        params["next_in"] = next_check_in_s
    if sira_decision is not None:
        sets.append("sira_decision = CAST(:sira_decision AS jsonb)")
        params["sira_decision"] = _json(sira_decision)
    if decided:
        sets.append("decided_at = now()")
    if not isinstance(pending_action, Keep):
        sets.append("pending_action = CAST(:pending_action AS jsonb)")
        params["pending_action"] = (
            None if pending_action is None else _json(pending_action.as_json())
        )
    if severity is not None:
        sets.append("severity = :severity")
        params["severity"] = severity
    if muted is not None:
        sets.append("muted_at = coalesce(muted_at, now())" if muted else "muted_at = NULL")
    result = await session.execute(
        text(
            f"UPDATE plugin_incidents SET {', '.join(sets)}"
            " WHERE id = :id AND status = ANY(:expected) RETURNING id"
        ),
        params,
    )
    return result.first() is not None


async def lock_incident(
    session: AsyncSession, incident_id: uuid.UUID, expected: str | tuple[str, ...]
) -> bool:
    """Row-lock the incident for this transaction if it is still in `expected`."""
    expected_tuple = (expected,) if isinstance(expected, str) else expected
    result = await session.execute(
        text(
            "SELECT id FROM plugin_incidents WHERE id = :id AND status = ANY(:expected) FOR UPDATE"
        ),
        {"id": incident_id, "expected": list(expected_tuple)},
    )
    return result.first() is not None


async def lock_incident_for_action(
    session: AsyncSession, incident_id: uuid.UUID, *, tenants: list[str] | None = None
) -> Any | None:
    """The incident as an operator's approval or manual action needs it (status, pending
    action, the installation's current, known-good and rollback target versions, the
    attempt generation), row-locked for this
    transaction; None when there is no such incident, or it is not of one of `tenants` (the
    acting user's scope; None: every tenant; a fleet incident is of no tenant)."""
    return (
        await session.execute(
            text(
                "SELECT i.id, i.status, i.installation_id, i.tenant_id, i.plugin_name,"
                " i.severity, i.pending_action, m.plugin_version AS current_version,"
                f" {ROLLBACK_TARGET_SQL} AS previous_version, m.known_good_version,"
                f" {attempt_generation_sql('i.id')} AS attempt_generation"
                " FROM plugin_incidents i LEFT JOIN merchant_plugins m ON m.id = i.installation_id"
                " WHERE i.id = :id"
                "  AND (CAST(:scope AS text[]) IS NULL OR i.tenant_id = ANY(:scope))"
                " FOR UPDATE OF i"
            ),
            {"id": incident_id, "scope": tenants},
        )
    ).first()


async def insert_attempt(
    session: AsyncSession,
    *,
    incident_id: uuid.UUID,
    installation_id: uuid.UUID,
    action: str,
    from_version: str | None,
    to_version: str,
    automatic: bool,
    decision_source: str,
    confidence: float | None,
    requested_by: str,
) -> uuid.UUID | None:
    """A new attempt, or None when the incident already has one in flight (the partial
    unique index: a job run twice cannot start two)."""
    result = await session.execute(
        text(
            f"""
            INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, action,
                from_version, to_version, status, automatic, decision_source, confidence,
                requested_by)
            VALUES (:incident, :installation, :action, :from_version, :to_version, 'pending',
                    :automatic, :source, :confidence, :requested_by)
            ON CONFLICT (incident_id)
                WHERE status IN {ATTEMPT_IN_FLIGHT_SQL}
            DO NOTHING
            RETURNING id
            """
        ),
        {
            "incident": incident_id,
            "installation": installation_id,
            "action": action,
            "from_version": from_version,
            "to_version": to_version,
            "automatic": automatic,
            "source": decision_source,
            "confidence": None if confidence is None else Decimal(str(round(confidence, 3))),
            "requested_by": requested_by,
        },
    )
    attempt_id: uuid.UUID | None = result.scalar_one_or_none()
    return attempt_id


async def move_attempt(
    session: AsyncSession,
    attempt_id: uuid.UUID,
    *,
    expected: str,
    status: str | None = None,
    staging_run_id: str | None = None,
    clear_run_id: bool = False,
    staging_report: dict[str, Any] | None = None,
    staging_tries_add: int = 0,
    executed: bool = False,
    verify_for_s: float | None = None,
    failure_reason: str | None = None,
    rollback_reason: str | None = None,
    rolled_back: bool = False,
    finished: bool = False,
) -> bool:
    sets = ["updated_at = now()"]
    params: dict[str, Any] = {"id": attempt_id, "expected": expected}
    if status is not None:
        sets.append("status = :status")
        params["status"] = status
    if staging_run_id is not None or clear_run_id:
        sets.append("staging_run_id = :run_id")
        params["run_id"] = staging_run_id
    if staging_report is not None:
        sets.append("staging_report = CAST(:report AS jsonb)")
        params["report"] = _json(staging_report)
    if staging_tries_add:
        sets.append("staging_tries = staging_tries + :tries")
        params["tries"] = staging_tries_add
    if executed:
        sets.append("executed_at = coalesce(executed_at, now())")
    if verify_for_s is not None:
        sets.append("verify_deadline_at = now() + make_interval(secs => :verify_for)")
        params["verify_for"] = verify_for_s
    if failure_reason is not None:
        sets.append("failure_reason = :failure")
        params["failure"] = failure_reason[:2000]
    if rollback_reason is not None:
        sets.append("rollback_reason = :rollback_reason")
        params["rollback_reason"] = rollback_reason[:2000]
    if rolled_back:
        sets.append("rolled_back_at = now()")
    if finished:
        sets.append("finished_at = now()")
    result = await session.execute(
        text(
            f"UPDATE plugin_autopatch_attempts SET {', '.join(sets)}"
            " WHERE id = :id AND status = :expected RETURNING id"
        ),
        params,
    )
    return result.first() is not None


async def lock_attempt(session: AsyncSession, attempt_id: uuid.UUID) -> None:
    await session.execute(
        text("SELECT 1 FROM plugin_autopatch_attempts WHERE id = :id FOR UPDATE"),
        {"id": attempt_id},
    )


async def lock_command(session: AsyncSession, command_id: uuid.UUID) -> str | None:
    """The command's status, row-locked: ingest cannot hand it out while we decide."""
    result = await session.execute(
        text("SELECT status FROM plugin_agent_commands WHERE id = :id FOR UPDATE"),
        {"id": command_id},
    )
    status: str | None = result.scalar_one_or_none()
    return status


async def expire_command(session: AsyncSession, command_id: uuid.UUID) -> bool:
    result = await session.execute(
        text(
            "UPDATE plugin_agent_commands SET status = 'expired'"
            " WHERE id = :id AND status IN ('pending', 'delivered') RETURNING id"
        ),
        {"id": command_id},
    )
    return result.first() is not None


async def kill_switch_engaged(session: AsyncSession, *, before_change: bool) -> bool:
    """True when autopatch is off, or the policy cannot be read (fail closed).

    before_change: the caller is about to change production in this transaction; the row is
    then share-locked like the gate does it (after the gate's advisory lock, so share locks
    never pile up and starve the kill switch), and a concurrent kill switch is either seen or
    waits for our commit. A caller that only cancels needs no lock: cancelling is always safe."""
    if before_change:
        await serialize_gate_decisions(session)
    enabled = await autopatch_enabled(session, for_share=before_change)
    return enabled is not True


async def samples_since(
    session: AsyncSession,
    installation_id: uuid.UUID,
    *,
    since: datetime,
    version: str,
    limit: int,
) -> list[Any]:
    """The newest heartbeats on `version` received after `since`, newest first. A heartbeat
    received after `since` was signed after `since` - SIGNED_AT_SLACK (app/core/partitions.py):
    that bound keeps the read to the partitions since then."""
    rows = await session.execute(
        text(
            f"""
            SELECT received_at, requests, errors, webhook_attempts, webhook_failures, uptime_s,
                   sent_at
            FROM plugin_heartbeats
            WHERE installation_id = :installation AND received_at > :since
              AND signed_at > CAST(:since AS timestamptz) - {SIGNED_AT_SLACK_SQL}
              AND signed_at < now() + {SIGNED_AT_SLACK_SQL}
              AND plugin_version = :version
            ORDER BY received_at DESC
            LIMIT :limit
            """
        ),
        {"installation": installation_id, "since": since, "version": version, "limit": limit},
    )
    return list(rows)


async def outcome_stats(
    session: AsyncSession, *, plugin_name: str, incident_type: str, tenant_id: str | None
) -> dict[str, OutcomeStats]:
    """How patches to each version ended for this plugin and incident type: what the
    fallback's 'best observed candidate' rule ranks. Weighed by tenant: the outcomes on
    `tenant_id`'s own installations count one each; every other tenant counts as one outcome
    in all, split by its own success rate, so that one tenant's installations (their
    telemetry is theirs to send) cannot make a version look good or bad for the others."""
    rows = await session.execute(
        text(
            """
            WITH per_tenant AS (
                SELECT a.to_version, m.tenant_id,
                       count(*) FILTER (WHERE a.status = 'success') AS successes,
                       count(*) FILTER (WHERE a.status IN ('failed', 'rolled_back'))
                           AS failures
                FROM plugin_autopatch_attempts a
                JOIN plugin_incidents i ON i.id = a.incident_id
                JOIN merchant_plugins m ON m.id = a.installation_id
                WHERE i.plugin_name = :plugin AND i.type = :type AND a.action = 'patch'
                  AND a.to_version IS NOT NULL
                GROUP BY a.to_version, m.tenant_id
            ), weighed AS (
                SELECT to_version,
                       CASE WHEN tenant_id = CAST(:tenant AS text) THEN 1.0
                            ELSE 1.0 / greatest(successes + failures, 1) END AS weight,
                       successes, failures
                FROM per_tenant
            )
            SELECT to_version,
                   sum(successes * weight)::float8 AS successes,
                   sum(failures * weight)::float8 AS failures
            FROM weighed
            GROUP BY to_version
            """
        ),
        {"plugin": plugin_name, "type": incident_type, "tenant": tenant_id},
    )
    return {r.to_version: OutcomeStats(r.successes, r.failures) for r in rows}


# An attempt that took an installation away from a version because it failed there: a patch
# rolled back (its to_version failed), or a rollback that healed (its from_version failed).
_FAILED_VERSION_OF_ATTEMPT = """
    CASE WHEN a.action = 'patch' AND a.status = 'rolled_back' THEN a.to_version
         WHEN a.action = 'rollback' AND a.status = 'success' THEN a.from_version END"""


@dataclass(frozen=True, slots=True)
class RollbackTally:
    """How often installations of a plugin were rolled back from one version."""

    total: int  # fleet-wide
    tenants: int  # distinct tenants of those installations
    tenant: int  # on the installations of the tenant asked about


async def rollbacks_of_version(
    session: AsyncSession, *, plugin_name: str, version: str, tenant_id: str | None
) -> RollbackTally:
    """How many times installations of the plugin were rolled back from `version`, from how
    many tenants' installations, and how many times on `tenant_id`'s."""
    row = (
        await session.execute(
            text(
                f"""
                SELECT count(*) AS total, count(DISTINCT m.tenant_id) AS tenants,
                       count(*) FILTER (WHERE m.tenant_id = :tenant) AS tenant
                FROM plugin_autopatch_attempts a
                JOIN merchant_plugins m ON m.id = a.installation_id
                WHERE m.plugin_name = :plugin AND {_FAILED_VERSION_OF_ATTEMPT} = :version
                """
            ),
            {"plugin": plugin_name, "version": version, "tenant": tenant_id},
        )
    ).one()
    return RollbackTally(int(row.total), int(row.tenants), int(row.tenant))


async def versions_failed_on(
    session: AsyncSession, installation_id: uuid.UUID | None
) -> frozenset[str]:
    """The versions this installation was rolled back from: not to be proposed to it again."""
    if installation_id is None:
        return frozenset()
    result = await session.execute(
        text(
            f"""
            SELECT DISTINCT {_FAILED_VERSION_OF_ATTEMPT} FROM plugin_autopatch_attempts a
            WHERE a.installation_id = :installation
              AND a.status IN ('rolled_back', 'success')
            """
        ),
        {"installation": installation_id},
    )
    return frozenset(version for version in result.scalars() if version is not None)


async def sql_rolled_back_without_command(session: AsyncSession, *, limit: int) -> list[Any]:
    """Attempts marked rolled_back (e.g. by the runbook's "rollback all recent patches"
    statement typed in psql) for which no rollback command was ever queued: the loop queues
    it, so the statement has the effect ops expect."""
    rows = await session.execute(
        text(
            """
            SELECT a.id, a.installation_id, a.from_version, a.rollback_reason, m.plugin_name
            FROM plugin_autopatch_attempts a
            JOIN merchant_plugins m ON m.id = a.installation_id
            WHERE a.status = 'rolled_back' AND a.action = 'patch'
              AND a.rolled_back_at > now() - interval '1 day'
              AND a.executed_at IS NOT NULL AND a.from_version IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM plugin_agent_commands c
                              WHERE c.attempt_id = a.id AND c.type = 'rollback')
            ORDER BY a.rolled_back_at DESC
            LIMIT :limit
            FOR UPDATE OF a SKIP LOCKED
            """
        ),
        {"limit": limit},
    )
    return list(rows)
