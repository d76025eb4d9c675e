"""Read side for ops: incident lists with keyset paging, one incident with its timeline,
attempts, KPIs. Every statement here only reads."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.policy.gate import key_of

INCIDENT_COLUMNS = (
    "id, installation_id, tenant_id, plugin_name, plugin_version, type, severity, status,"
    " status_reason, first_bad_signal_at, detected_at, resolved_at, occurrences, updated_at,"
    " fleet_incident_id"
)
# Members listed with a fleet incident's detail; its snapshot has the full count.
FLEET_MEMBERS_SHOWN = 500


class BadCursor(ValueError):
    pass


def encode_cursor(detected_at: datetime, incident_id: uuid.UUID) -> str:
    raw = orjson.dumps([detected_at.isoformat(), str(incident_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        moment, incident_id = orjson.loads(raw)
        return datetime.fromisoformat(moment), uuid.UUID(incident_id)
    except (ValueError, TypeError) as exc:
        raise BadCursor("cursor is not one this API handed out") from exc


async def list_incidents(
    session: AsyncSession,
    *,
    status: str | None,
    severity: str | None,
    tenant: str | None,
    plugin: str | None,
    incident_type: str | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Newest first; `after` is the (detected_at, id) of the last row of the previous page."""
    conditions = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    for column, value in (
        ("status", status),
        ("severity", severity),
        ("tenant_id", tenant),
        ("plugin_name", plugin),
        ("type", incident_type),
    ):
        if value is not None:
            conditions.append(f"{column} = :{column}")
            params[column] = value
    if after is not None:
        conditions.append("(detected_at, id) < (:after_at, :after_id)")
        params.update(after_at=after[0], after_id=after[1])
    rows = await session.execute(
        text(
            f"SELECT {INCIDENT_COLUMNS} FROM plugin_incidents WHERE {' AND '.join(conditions)}"
            " ORDER BY detected_at DESC, id DESC LIMIT :limit"
        ),
        params,
    )
    return [_plain(row._mapping) for row in rows]


async def incident_detail(session: AsyncSession, incident_id: uuid.UUID) -> dict[str, Any] | None:
    row = (
        await session.execute(
            text(
                f"SELECT {INCIDENT_COLUMNS}, telemetry_snapshot, sira_decision,"
                " pending_action, decided_at, escalated_at, next_check_at"
                " FROM plugin_incidents WHERE id = :id"
            ),
            {"id": incident_id},
        )
    ).first()
    if row is None:
        return None
    incident = _plain(row._mapping)
    pending = incident["pending_action"]
    incident["pending_action_key"] = (
        key_of(
            incident["id"],
            incident["installation_id"],
            str(pending.get("action")),
            pending.get("from_version"),
            pending.get("to_version"),
        )
        if isinstance(pending, dict)
        else None
    )
    if incident["installation_id"] is None:
        # A fleet incident (app/incidents/fleet.py): the installations' incidents it groups.
        members = await session.execute(
            text(
                f"SELECT {INCIDENT_COLUMNS} FROM plugin_incidents"
                " WHERE fleet_incident_id = :id ORDER BY detected_at DESC, id DESC LIMIT :n"
            ),
            {"id": incident_id, "n": FLEET_MEMBERS_SHOWN},
        )
        incident["members"] = [_plain(r._mapping) for r in members]
    incident["attempts"] = await list_attempts(
        session, incident_id=incident_id, plugin=None, status=None, limit=100
    )
    approvals = await session.execute(
        text(
            "SELECT a.id, u.username, a.action_key, a.comment, a.created_at, a.expires_at"
            " FROM approvals a JOIN ops_users u ON u.id = a.user_id"
            " WHERE a.incident_id = :id ORDER BY a.created_at"
        ),
        {"id": incident_id},
    )
    incident["approvals"] = [_plain(r._mapping) for r in approvals]
    events = await session.execute(
        text(
            "SELECT e.at, e.attempt_id, e.old_status, e.new_status, e.db_user, e.actor"
            " FROM plugin_autopatch_attempt_events e"
            " JOIN plugin_autopatch_attempts a ON a.id = e.attempt_id"
            " WHERE a.incident_id = :id ORDER BY e.id"
        ),
        {"id": incident_id},
    )
    timeline: list[dict[str, Any]] = []
    if incident["first_bad_signal_at"] is not None:
        timeline.append({"at": incident["first_bad_signal_at"], "event": "first bad signal"})
    timeline.append({"at": incident["detected_at"], "event": f"detected ({incident['type']})"})
    decision = incident.get("sira_decision")
    if incident["decided_at"] is not None and isinstance(decision, dict):
        version = f" {decision.get('patch_version')}" if decision.get("patch_version") else ""
        timeline.append(
            {
                "at": incident["decided_at"],
                "event": f"decided ({decision.get('source')}): {decision.get('action')}{version},"
                f" confidence {decision.get('confidence')}",
            }
        )
    for approval in incident["approvals"]:
        timeline.append(
            {"at": approval["created_at"], "event": "approved", "by": approval["username"]}
        )
    if incident["escalated_at"] is not None:
        timeline.append({"at": incident["escalated_at"], "event": "escalated to ops"})
    for event in events:
        timeline.append(
            {
                "at": event.at,
                "event": f"attempt {event.attempt_id}: {event.old_status or 'created'} -> "
                f"{event.new_status}",
                "by": event.actor or event.db_user,
            }
        )
    if incident["resolved_at"] is not None:
        timeline.append(
            {
                "at": incident["resolved_at"],
                "event": f"{incident['status']}: {incident['status_reason']}",
            }
        )
    incident["timeline"] = sorted(timeline, key=lambda item: item["at"])
    return incident


async def list_attempts(
    session: AsyncSession,
    *,
    incident_id: uuid.UUID | None,
    plugin: str | None,
    status: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    conditions = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if incident_id is not None:
        conditions.append("a.incident_id = :incident")
        params["incident"] = incident_id
    if plugin is not None:
        conditions.append("m.plugin_name = :plugin")
        params["plugin"] = plugin
    if status is not None:
        conditions.append("a.status = :status")
        params["status"] = status
    rows = await session.execute(
        text(
            "SELECT a.id, a.incident_id, a.installation_id, a.action, a.from_version,"
            " a.to_version, a.status, a.decision_source, a.confidence, a.requested_by,"
            " a.created_at, a.executed_at, a.finished_at, a.failure_reason, a.rollback_reason,"
            " a.rolled_back_at"
            " FROM plugin_autopatch_attempts a"
            " LEFT JOIN merchant_plugins m ON m.id = a.installation_id"
            f" WHERE {' AND '.join(conditions)} ORDER BY a.created_at DESC LIMIT :limit"
        ),
        params,
    )
    return [_plain(row._mapping) for row in rows]


async def kpis(session: AsyncSession, *, days: int) -> dict[str, Any]:
    """The brief's KPIs, NULL-safe: a window without attempts has no rate, not an error."""
    attempts = (
        await session.execute(
            text(
                "SELECT count(*) AS attempts,"
                " count(*) FILTER (WHERE status = 'success') * 100.0 / NULLIF(count(*), 0)"
                "   AS success_rate,"
                " count(*) FILTER (WHERE status = 'rolled_back') * 100.0 / NULLIF(count(*), 0)"
                "   AS rollback_rate"
                " FROM plugin_autopatch_attempts"
                " WHERE executed_at > now() - make_interval(days => :days)"
            ),
            {"days": days},
        )
    ).one()
    times = (
        await session.execute(
            text(
                "SELECT count(*) AS incidents,"
                " extract(epoch FROM avg(detected_at - first_bad_signal_at)) AS mttd_s,"
                " extract(epoch FROM avg(resolved_at - detected_at)"
                "   FILTER (WHERE resolved_at IS NOT NULL)) AS mttr_s"
                " FROM plugin_incidents WHERE detected_at > now() - make_interval(days => :days)"
            ),
            {"days": days},
        )
    ).one()
    severity = await session.execute(
        text(
            "SELECT severity, count(*) FROM plugin_incidents"
            " WHERE detected_at > now() - interval '24 hours' GROUP BY severity"
        )
    )
    return {
        "window_days": days,
        "attempts": attempts.attempts,
        "success_rate": _number(attempts.success_rate),
        "rollback_rate": _number(attempts.rollback_rate),
        "incidents": times.incidents,
        "mttd_s": _number(times.mttd_s),
        "mttr_s": _number(times.mttr_s),
        "incidents_by_severity_24h": {row[0]: row[1] for row in severity},
    }


def _plain(mapping: Any) -> dict[str, Any]:
    """A row as JSON-ready values: numerics as numbers, not strings."""
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in mapping.items()}


def _number(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)
