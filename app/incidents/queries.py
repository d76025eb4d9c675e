"""Read side for ops: incident lists with keyset paging, one incident with its timeline,
attempts, KPIs and the series the dashboard charts (severity over time, time to approval,
decision confidence, calibration). Every statement here only reads, and each takes the
reader's tenant scope (`tenants`: a tenant-scoped ops user's; None: every tenant) into its SQL.

Over 600 lines: every read over incidents and attempts that the ops API and the dashboard
share, with the one tenant-scope rule (`scope_sql`) they all apply; split by page, the scope
rule would have to be imported back by each part."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import orjson
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.models import SEVERITIES
from app.incidents.schemas import (
    Calibration,
    CalibrationBucket,
    CalibrationSeries,
    ConfidenceBucket,
    ConfidenceDistribution,
    KpiPoint,
    KpiSeries,
    SeverityPoint,
    SeveritySeries,
    TimeToApproval,
)
from app.policy.gate import key_of
from app.policy.repository import attempt_generation_sql

INCIDENT_COLUMNS = (
    "id, installation_id, tenant_id, plugin_name, plugin_version, type, severity, status,"
    " status_reason, first_bad_signal_at, detected_at, resolved_at, occurrences, updated_at,"
    " fleet_incident_id, muted_at"
)
# An attempt as the ops read side shows it (alias `a` for plugin_autopatch_attempts).
ATTEMPT_COLUMNS = (
    "a.id, a.incident_id, a.installation_id, a.action, a.from_version, a.to_version, a.status,"
    " a.decision_source, a.confidence, a.requested_by, a.created_at, a.executed_at,"
    " a.finished_at, a.failure_reason, a.rollback_reason, a.rolled_back_at"
)
# Members listed with a fleet incident's detail; its snapshot has the full count.
FLEET_MEMBERS_SHOWN = 500


class BadCursor(ValueError):
    pass


# A tenant-scoped ops user's reads (app/ops/security.py, OpsUser.scope): the tenants to keep;
# None: every tenant. The condition goes in the statement, with the tenants bound as :scope.
Scope = list[str] | None


def scope_sql(tenant_column: str, tenants: Scope) -> str:
    """The condition keeping rows whose `tenant_id` column is in the scope (TRUE: no scope).
    A row without a tenant (a fleet incident) is outside every scope."""
    return "TRUE" if tenants is None else f"{tenant_column} = ANY(:scope)"


def installation_scope_sql(installation_column: str, tenants: Scope) -> str:
    """The same for rows that name an installation (attempts): its tenant in the scope."""
    if tenants is None:
        return "TRUE"
    return (
        f"{installation_column} IN (SELECT sm.id FROM merchant_plugins sm"
        " WHERE sm.tenant_id = ANY(:scope))"
    )


def scope_params(tenants: Scope) -> dict[str, Any]:
    return {} if tenants is None else {"scope": tenants}


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
    tenants: Scope = None,
) -> list[dict[str, Any]]:
    """Newest first; `after` is the (detected_at, id) of the last row of the previous page;
    `tenants`: the reader's scope."""
    conditions, params = _incident_filters(
        status=status,
        severity=severity,
        tenant=tenant,
        plugin=plugin,
        incident_type=incident_type,
        tenants=tenants,
    )
    params["limit"] = limit
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


def _incident_filters(
    *,
    status: str | None,
    severity: str | None,
    tenant: str | None,
    plugin: str | None,
    incident_type: str | None,
    tenants: Scope = None,
) -> tuple[list[str], dict[str, Any]]:
    conditions = [scope_sql("tenant_id", tenants)]
    params: dict[str, Any] = scope_params(tenants)
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
    return conditions, params


async def count_by_severity(
    session: AsyncSession,
    *,
    status: str | None,
    tenant: str | None,
    plugin: str | None,
    incident_type: str | None,
    tenants: Scope = None,
) -> dict[str, int]:
    """How many incidents of each severity match the filters (all pages; severity aside, so
    the counts say what each severity filter would show), in the reader's scope."""
    conditions, params = _incident_filters(
        status=status,
        severity=None,
        tenant=tenant,
        plugin=plugin,
        incident_type=incident_type,
        tenants=tenants,
    )
    rows = await session.execute(
        text(
            "SELECT severity, count(*) FROM plugin_incidents"
            f" WHERE {' AND '.join(conditions)} GROUP BY severity"
        ),
        params,
    )
    return {row[0]: row[1] for row in rows}


async def incident_detail(
    session: AsyncSession, incident_id: uuid.UUID, *, tenants: Scope = None
) -> dict[str, Any] | None:
    """One incident with its members (a fleet incident), attempts, approvals and timeline;
    None when there is none with this id in the reader's scope (`tenants`)."""
    row = (
        await session.execute(
            text(
                f"SELECT {INCIDENT_COLUMNS}, telemetry_snapshot, sira_decision,"
                " pending_action, decided_at, escalated_at, next_check_at,"
                f" {attempt_generation_sql('plugin_incidents.id')} AS attempt_generation"
                f" FROM plugin_incidents WHERE id = :id AND {scope_sql('tenant_id', tenants)}"
            ),
            {"id": incident_id, **scope_params(tenants)},
        )
    ).first()
    if row is None:
        return None
    incident = _plain(row._mapping)
    pending = incident["pending_action"]
    generation = int(incident.pop("attempt_generation"))
    incident["pending_action_key"] = (
        key_of(
            incident["id"],
            incident["installation_id"],
            str(pending.get("action")),
            pending.get("from_version"),
            pending.get("to_version"),
            generation,
        )
        if isinstance(pending, dict)
        else None
    )
    if incident["installation_id"] is None:
        # A fleet incident (app/incidents/fleet.py): the installations' incidents it groups.
        members = await session.execute(
            text(
                f"SELECT {INCIDENT_COLUMNS} FROM plugin_incidents"
                f" WHERE fleet_incident_id = :id AND {scope_sql('tenant_id', tenants)}"
                " ORDER BY detected_at DESC, id DESC LIMIT :n"
            ),
            {"id": incident_id, "n": FLEET_MEMBERS_SHOWN, **scope_params(tenants)},
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
    tenants: Scope = None,
) -> list[dict[str, Any]]:
    """Newest first; only attempts on installations of the reader's scope (`tenants`)."""
    conditions = [scope_sql("m.tenant_id", tenants)]
    params: dict[str, Any] = {"limit": limit, **scope_params(tenants)}
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
            f"SELECT {ATTEMPT_COLUMNS}"
            " FROM plugin_autopatch_attempts a"
            " LEFT JOIN merchant_plugins m ON m.id = a.installation_id"
            f" WHERE {' AND '.join(conditions)} ORDER BY a.created_at DESC LIMIT :limit"
        ),
        params,
    )
    return [_plain(row._mapping) for row in rows]


# An incident the loop healed (resolved, with a successful attempt) or rolled back
# (rolled_back, with a rolled-back attempt): what MTTR of the loop counts.
_LOOP_CLOSED = (
    "i.resolved_at IS NOT NULL AND i.status IN ('resolved', 'rolled_back')"
    " AND EXISTS (SELECT 1 FROM plugin_autopatch_attempts a WHERE a.incident_id = i.id"
    "  AND a.status IN ('success', 'rolled_back'))"
)


async def kpis(session: AsyncSession, *, days: int, tenants: Scope = None) -> dict[str, Any]:
    """The brief's KPIs, NULL-safe: a window without attempts has no rate, not an error.

    `mttr_s` is the mean over every incident of the window closed with a resolved_at (an
    operator's resolve, a recovery, an ignore included); `mttr_loop_s` only over the
    incidents the loop healed or rolled back (`_LOOP_CLOSED`). The time to approval is
    `time_to_approval`'s means (an approximation: see there). Everything counts only the
    reader's tenants (`tenants`)."""
    scope = scope_params(tenants)
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
                f" AND {installation_scope_sql('installation_id', tenants)}"
            ),
            {"days": days, **scope},
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
                f" AND {scope_sql('tenant_id', tenants)}"
            ),
            {"days": days, **scope},
        )
    ).one()
    severity = await session.execute(
        text(
            "SELECT severity, count(*) FROM plugin_incidents"
            " WHERE detected_at > now() - interval '24 hours'"
            f" AND {scope_sql('tenant_id', tenants)} GROUP BY severity"
        ),
        scope,
    )
    # MTTR of the loop's own work: incidents it healed (resolved, with a successful attempt)
    # or rolled back (rolled_back, with a rolled-back attempt); an incident resolved by hand
    # or by recovery alone, without such an attempt, is not the loop's.
    loop = (
        await session.execute(
            text(
                "SELECT count(*) AS incidents,"
                " extract(epoch FROM avg(i.resolved_at - i.detected_at)) AS mttr_s"
                " FROM plugin_incidents i"
                f" WHERE i.detected_at > now() - make_interval(days => :days) AND {_LOOP_CLOSED}"
                f" AND {scope_sql('i.tenant_id', tenants)}"
            ),
            {"days": days, **scope},
        )
    ).one()
    approval = await time_to_approval(session, days=days, tenants=tenants)
    return {
        "window_days": days,
        "attempts": attempts.attempts,
        "success_rate": _number(attempts.success_rate),
        "rollback_rate": _number(attempts.rollback_rate),
        "incidents": times.incidents,
        "mttd_s": _number(times.mttd_s),
        "mttr_s": _number(times.mttr_s),
        "incidents_by_severity_24h": {row[0]: row[1] for row in severity},
        "mttr_loop_s": _number(loop.mttr_s),
        "loop_closed_incidents": loop.incidents,
        "time_to_first_approval_s": approval.first_vote_mean_s,
        "time_to_quorum_s": approval.quorum_mean_s,
    }


async def severity_series(
    session: AsyncSession, *, bucket: Literal["hour", "day"], count: int, tenants: Scope = None
) -> SeveritySeries:
    """Incidents detected per `bucket` (UTC) and severity, the last `count` buckets, the
    current one (partial) last; every bucket and every severity present, 0 when none. The
    dashboard's two: `bucket="hour", count=24` and `bucket="day", count=7`."""
    step = {"hour": "1 hour", "day": "1 day"}[bucket]
    rows = (
        await session.execute(
            text(
                "WITH b AS (SELECT date_trunc(:unit, now() AT TIME ZONE 'UTC') AS current)"
                " SELECT b.current, date_trunc(:unit, i.detected_at AT TIME ZONE 'UTC') AS start,"
                "  i.severity, count(i.id) AS n"
                " FROM b LEFT JOIN plugin_incidents i ON i.detected_at >="
                "  (b.current - CAST(:step AS interval) * (:count - 1)) AT TIME ZONE 'UTC'"
                f"  AND {scope_sql('i.tenant_id', tenants)}"
                " GROUP BY 1, 2, 3"
            ),
            {"unit": bucket, "step": step, "count": count, **scope_params(tenants)},
        )
    ).all()
    current: datetime = rows[0].current
    width = timedelta(hours=1) if bucket == "hour" else timedelta(days=1)
    starts = [current - width * (count - 1 - k) for k in range(count)]
    counts: dict[datetime, dict[str, int]] = {s: dict.fromkeys(SEVERITIES, 0) for s in starts}
    for row in rows:
        if row.start in counts and row.severity is not None:
            counts[row.start][row.severity] = counts[row.start].get(row.severity, 0) + row.n
    return SeveritySeries(
        bucket=bucket,
        points=[
            SeverityPoint(
                start=s.replace(tzinfo=UTC), counts=counts[s], total=sum(counts[s].values())
            )
            for s in starts
        ],
    )


async def kpi_series(session: AsyncSession, *, days: int = 7, tenants: Scope = None) -> KpiSeries:
    """The brief's four KPIs per UTC day, the last `days` days (today, partial, last), as
    `kpis` counts them: rates (percent) over the attempts executed that day, MTTD and the
    loop's MTTR over the incidents detected that day. None where a day has nothing."""
    current = (
        await session.execute(text("SELECT date_trunc('day', now() AT TIME ZONE 'UTC')"))
    ).scalar_one()
    since = (current - timedelta(days=days - 1)).replace(tzinfo=UTC)
    attempts = await session.execute(
        text(
            "SELECT date_trunc('day', executed_at AT TIME ZONE 'UTC') AS day, count(*) AS n,"
            " count(*) FILTER (WHERE status = 'success') * 100.0 / count(*) AS ok,"
            " count(*) FILTER (WHERE status = 'rolled_back') * 100.0 / count(*) AS back"
            " FROM plugin_autopatch_attempts WHERE executed_at >= :since"
            f" AND {installation_scope_sql('installation_id', tenants)} GROUP BY 1"
        ),
        {"since": since, **scope_params(tenants)},
    )
    by_day = {row.day: row for row in attempts}
    incidents = await session.execute(
        text(
            "SELECT date_trunc('day', i.detected_at AT TIME ZONE 'UTC') AS day,"
            " extract(epoch FROM avg(i.detected_at - i.first_bad_signal_at)) AS mttd_s,"
            " extract(epoch FROM avg(i.resolved_at - i.detected_at)"
            f"  FILTER (WHERE {_LOOP_CLOSED})) AS mttr_s"
            " FROM plugin_incidents i WHERE i.detected_at >= :since"
            f" AND {scope_sql('i.tenant_id', tenants)} GROUP BY 1"
        ),
        {"since": since, **scope_params(tenants)},
    )
    times = {row.day: row for row in incidents}
    points = []
    for k in range(days):
        day = current - timedelta(days=days - 1 - k)
        a, t = by_day.get(day), times.get(day)
        points.append(
            KpiPoint(
                start=day.replace(tzinfo=UTC),
                attempts=a.n if a else 0,
                success_rate=_number(a.ok) if a else None,
                rollback_rate=_number(a.back) if a else None,
                mttd_s=_number(t.mttd_s) if t else None,
                mttr_loop_s=_number(t.mttr_s) if t else None,
            )
        )
    return KpiSeries(points=points)


async def time_to_approval(
    session: AsyncSession, *, days: int, tenants: Scope = None
) -> TimeToApproval:
    """How long incidents detected in the last `days` waited for operators' votes.

    An approximation, because no column records when an incident entered awaiting_approval:
    the wait is counted from the incident's `decided_at` (the loop records its decision and
    runs the gate that asks for approvals in one transaction, so for the loop's own decisions
    this is the moment the wait began), or from `detected_at` when nothing was decided (an
    operator's manual action, which stamps no time). Not exact for an operator's action
    asked after a loop decision (counted from the decision: longer than the real wait) nor
    for a second wait after a cancelled attempt (votes before the latest decision are not
    counted). First vote: the earliest vote after that moment. Quorum: the moment the
    `approvals_required`-th vote for one same action (action_key) arrived, with today's
    policy value (the value at the time is not kept with the votes); a vote's expiry is not
    taken into account."""
    row = (
        await session.execute(
            text(
                "WITH required AS (SELECT approvals_required AS n FROM ops_policy WHERE id = 1),"
                " votes AS ("
                "  SELECT i.id, coalesce(i.decided_at, i.detected_at) AS began, v.created_at,"
                "   row_number() OVER (PARTITION BY i.id, v.action_key"
                "                      ORDER BY v.created_at, v.id) AS nth"
                "  FROM plugin_incidents i JOIN approvals v ON v.incident_id = i.id"
                "   AND v.created_at >= coalesce(i.decided_at, i.detected_at)"
                "  WHERE i.detected_at > now() - make_interval(days => :days)"
                f"   AND {scope_sql('i.tenant_id', tenants)}),"
                " per_incident AS ("
                "  SELECT extract(epoch FROM min(created_at) - began) AS first_s,"
                "   extract(epoch FROM min(created_at) FILTER"
                "    (WHERE nth = (SELECT n FROM required)) - began) AS quorum_s"
                "  FROM votes GROUP BY id, began)"
                " SELECT (SELECT n FROM required) AS required, count(*) AS incidents,"
                "  avg(first_s) AS first_mean,"
                "  percentile_cont(0.5) WITHIN GROUP (ORDER BY first_s) AS first_median,"
                "  count(quorum_s) AS quorum_incidents, avg(quorum_s) AS quorum_mean,"
                "  percentile_cont(0.5) WITHIN GROUP (ORDER BY quorum_s) AS quorum_median"
                " FROM per_incident"
            ),
            {"days": days, **scope_params(tenants)},
        )
    ).one()
    return TimeToApproval(
        incidents=row.incidents,
        first_vote_mean_s=_number(row.first_mean),
        first_vote_median_s=_number(row.first_median),
        quorum_incidents=row.quorum_incidents,
        quorum_mean_s=_number(row.quorum_mean),
        quorum_median_s=_number(row.quorum_median),
        approvals_required=row.required,
    )


# A confidence's bucket of 0.1 (0..9; 1.0 falls in the last one), from a numeric expression;
# NULL without a confidence (greatest and least skip NULLs: the CASE keeps it NULL).
def _bucket_sql(confidence: str) -> str:
    return (
        f"CASE WHEN {confidence} IS NOT NULL"
        f" THEN greatest(0, least(9, floor({confidence} * 10)))::int END"
    )


_DECISION_CONFIDENCE = (
    "CASE WHEN jsonb_typeof(i.sira_decision -> 'confidence') = 'number'"
    " THEN (i.sira_decision ->> 'confidence')::numeric END"
)


def _bounds(k: int) -> tuple[float, float]:
    return round(k / 10, 1), round((k + 1) / 10, 1)


async def confidence_distribution(
    session: AsyncSession, *, days: int, tenants: Scope = None
) -> ConfidenceDistribution:
    """The decisions recorded in the last `days` (`plugin_incidents.sira_decision`, by
    `decided_at`: the decision service's and the fallback's), by confidence in buckets of
    0.1, with each bucket's split by `source` and by `action`."""
    rows = await session.execute(
        text(
            f"SELECT {_bucket_sql(_DECISION_CONFIDENCE)} AS bucket,"
            " coalesce(i.sira_decision ->> 'source', 'unknown') AS source,"
            " coalesce(i.sira_decision ->> 'action', 'unknown') AS action, count(*) AS n"
            " FROM plugin_incidents i"
            " WHERE jsonb_typeof(i.sira_decision) = 'object'"
            "   AND i.decided_at > now() - make_interval(days => :days)"
            f"   AND {scope_sql('i.tenant_id', tenants)}"
            " GROUP BY 1, 2, 3"
        ),
        {"days": days, **scope_params(tenants)},
    )
    buckets = [
        ConfidenceBucket(lower=lo, upper=hi, count=0, by_source={}, by_action={})
        for lo, hi in map(_bounds, range(10))
    ]
    without = 0
    for row in rows:
        if row.bucket is None:
            without += row.n
            continue
        b = buckets[row.bucket]
        b.count += row.n
        b.by_source[row.source] = b.by_source.get(row.source, 0) + row.n
        b.by_action[row.action] = b.by_action.get(row.action, 0) + row.n
    return ConfidenceDistribution(
        total=sum(b.count for b in buckets), without_confidence=without, buckets=buckets
    )


CALIBRATION_SOURCES = ("sira", "fallback")


async def calibration(session: AsyncSession, *, days: int, tenants: Scope = None) -> Calibration:
    """Predicted confidence against actual success, by bucket of 0.1, for the decision
    service (`sira`) and the fallback separately. Counted over the attempts created in the
    last `days` that finished with an outcome that says whether the change worked: success
    (a success later rolled back counts as rolled_back), failed or rolled_back; cancelled
    and in-flight attempts say nothing and are left out, so are operators' (source
    `manual`). Source and confidence are the attempt's own columns, and the incident's
    recorded decision only where the attempt has none."""
    rows = await session.execute(
        text(
            "WITH finished AS ("
            "  SELECT coalesce(a.decision_source, i.sira_decision ->> 'source') AS source,"
            f"  coalesce(a.confidence, {_DECISION_CONFIDENCE}) AS confidence, a.status"
            "  FROM plugin_autopatch_attempts a"
            "  LEFT JOIN plugin_incidents i ON i.id = a.incident_id"
            "  WHERE a.status IN ('success', 'failed', 'rolled_back')"
            "    AND a.created_at > now() - make_interval(days => :days)"
            f"    AND {installation_scope_sql('a.installation_id', tenants)})"
            f" SELECT source, {_bucket_sql('confidence')} AS bucket, count(*) AS n,"
            "  count(*) FILTER (WHERE status = 'success') AS ok, avg(confidence) AS predicted"
            " FROM finished"
            " WHERE source IN :sources AND confidence IS NOT NULL"
            " GROUP BY 1, 2"
        ).bindparams(bindparam("sources", expanding=True)),
        {"days": days, "sources": list(CALIBRATION_SOURCES), **scope_params(tenants)},
    )
    found = {(row.source, row.bucket): row for row in rows}
    series = []
    for source in CALIBRATION_SOURCES:
        buckets = []
        for k in range(10):
            lo, hi = _bounds(k)
            row = found.get((source, k))
            n, ok = (row.n, row.ok) if row is not None else (0, 0)
            buckets.append(
                CalibrationBucket(
                    lower=lo,
                    upper=hi,
                    attempts=n,
                    successes=ok,
                    predicted=_number(row.predicted) if row is not None else None,
                    actual=round(ok / n, 3) if n else None,
                )
            )
        series.append(CalibrationSeries(source=source, buckets=buckets))
    return Calibration(series=series)


def _plain(mapping: Any) -> dict[str, Any]:
    """A row as JSON-ready values: numerics as numbers, not strings."""
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in mapping.items()}


def _number(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)
