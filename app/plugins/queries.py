"""Read side of the fleet for ops: installations by tenant, plugin and version with their
heartbeat and health, and one installation with its recent heartbeats and version history.
Every statement here only reads. The releases' outcome statistics are
app/releases/repository.py's (`release_outcomes`)."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import orjson
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.states import INCIDENT_CLOSED_SQL

# ok: heartbeats on time; overdue: the next one was expected before now; incident: an
# incident of the installation is open (whatever its heartbeats); unseen: registered, no
# heartbeat yet.
Health = Literal["ok", "overdue", "incident", "unseen"]
HEALTHS: tuple[Health, ...] = ("ok", "overdue", "incident", "unseen")
# Heartbeats shown on an installation's page by default (the newest).
RECENT_HEARTBEATS = 120

# (tenant_id, plugin_name, plugin_version, id) of the last row of a page.
FleetCursor = tuple[str, str, str, uuid.UUID]


class BadFleetCursor(ValueError):
    pass


class OpenIncident(BaseModel):
    id: uuid.UUID
    type: str
    severity: str
    status: str
    detected_at: datetime


class FleetInstallation(BaseModel):
    id: uuid.UUID
    tenant_id: str
    plugin_name: str
    plugin_version: str
    env: str
    status: str  # active or disabled
    last_heartbeat_at: datetime | None
    next_expected_at: datetime | None
    known_good_version: str | None
    health: Health
    # The most severe open incident (the newest among equals), and how many are open.
    open_incident: OpenIncident | None
    open_incidents: int


class FleetPage(BaseModel):
    items: list[FleetInstallation]
    # Pass it as `after` (or its encode_fleet_cursor string) for the next page; None: last.
    next_after: FleetCursor | None


class HeartbeatPoint(BaseModel):
    received_at: datetime
    plugin_version: str
    # Counters since the previous heartbeat, as the plugin reported them.
    requests: int
    errors: int
    webhook_attempts: int
    webhook_failures: int
    latency_p95_ms: float | None


class VersionSpan(BaseModel):
    version: str
    first_seen: datetime  # its first heartbeat of the run
    last_seen: datetime  # its last heartbeat of the run
    heartbeats: int


class InstallationDetail(BaseModel):
    installation: FleetInstallation
    previous_version: str | None
    version_changed_at: datetime | None
    known_good_at: datetime | None
    heartbeat_count: int
    created_at: datetime
    heartbeats: list[HeartbeatPoint]  # the newest `heartbeats` samples, oldest first
    # Runs of one version in the stored heartbeats, oldest first: a version seen again later
    # is a new run. Only as far back as heartbeats are kept (heartbeat_retention_days).
    versions: list[VersionSpan]


def encode_fleet_cursor(after: FleetCursor) -> str:
    raw = orjson.dumps([after[0], after[1], after[2], str(after[3])])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_fleet_cursor(cursor: str) -> FleetCursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        tenant, plugin, version, installation = orjson.loads(raw)
        if not all(isinstance(v, str) for v in (tenant, plugin, version)):
            raise TypeError("not strings")
        return tenant, plugin, version, uuid.UUID(installation)
    except (ValueError, TypeError) as exc:
        raise BadFleetCursor("cursor is not one this page handed out") from exc


# One row per installation with its health and most severe open incident.
_FLEET_SQL = f"""
SELECT m.id, m.tenant_id, m.plugin_name, m.plugin_version, m.env, m.status,
       m.last_heartbeat_at, m.next_expected_at, m.known_good_version, m.known_good_at,
       m.previous_version, m.version_changed_at, m.heartbeat_count, m.created_at,
       o.id AS incident_id, o.type AS incident_type, o.severity AS incident_severity,
       o.status AS incident_status, o.detected_at AS incident_detected_at,
       coalesce(o.n, 0) AS open_incidents,
       CASE WHEN o.id IS NOT NULL THEN 'incident'
            WHEN m.last_heartbeat_at IS NULL THEN 'unseen'
            WHEN m.next_expected_at < now() THEN 'overdue'
            ELSE 'ok' END AS health
FROM merchant_plugins m
LEFT JOIN LATERAL (
    SELECT i.id, i.type, i.severity, i.status, i.detected_at, count(*) OVER () AS n
    FROM plugin_incidents i
    WHERE i.installation_id = m.id AND i.status NOT IN {INCIDENT_CLOSED_SQL}
    ORDER BY array_position(ARRAY['critical', 'high', 'medium', 'low'], i.severity),
             i.detected_at DESC
    LIMIT 1
) o ON TRUE
"""


def _filters(
    tenant: str | None, plugin: str | None, version: str | None, tenants: list[str] | None
) -> tuple[list[str], dict[str, Any]]:
    """The filters' conditions and parameters; `tenants`, the reader's scope (None: every
    tenant), keeps only installations of those tenants."""
    conditions = ["TRUE" if tenants is None else "tenant_id = ANY(:scope)"]
    params: dict[str, Any] = {} if tenants is None else {"scope": tenants}
    for column, value in (
        ("tenant_id", tenant),
        ("plugin_name", plugin),
        ("plugin_version", version),
    ):
        if value is not None:
            conditions.append(f"{column} = :{column}")
            params[column] = value
    return conditions, params


def _installation(row: Any) -> FleetInstallation:
    incident = (
        OpenIncident(
            id=row.incident_id,
            type=row.incident_type,
            severity=row.incident_severity,
            status=row.incident_status,
            detected_at=row.incident_detected_at,
        )
        if row.incident_id is not None
        else None
    )
    return FleetInstallation(
        id=row.id,
        tenant_id=row.tenant_id,
        plugin_name=row.plugin_name,
        plugin_version=row.plugin_version,
        env=row.env,
        status=row.status,
        last_heartbeat_at=row.last_heartbeat_at,
        next_expected_at=row.next_expected_at,
        known_good_version=row.known_good_version,
        health=row.health,
        open_incident=incident,
        open_incidents=row.open_incidents,
    )


async def list_installations(
    session: AsyncSession,
    *,
    tenant: str | None = None,
    plugin: str | None = None,
    version: str | None = None,
    health: Health | None = None,
    after: FleetCursor | None = None,
    limit: int = 50,
    tenants: list[str] | None = None,
) -> FleetPage:
    """Installations by tenant, plugin, version (then id), filtered; `after` is the
    `next_after` of the previous page; `tenants`: the reader's scope."""
    conditions, params = _filters(tenant, plugin, version, tenants)
    params["limit"] = limit + 1
    if health is not None:
        conditions.append("health = :health")
        params["health"] = health
    if after is not None:
        conditions.append(
            "(tenant_id, plugin_name, plugin_version, id) > (:a_tenant, :a_plugin, :a_version,"
            " :a_id)"
        )
        params.update(a_tenant=after[0], a_plugin=after[1], a_version=after[2], a_id=after[3])
    rows = (
        await session.execute(
            text(
                f"SELECT * FROM ({_FLEET_SQL}) f WHERE {' AND '.join(conditions)}"
                " ORDER BY tenant_id, plugin_name, plugin_version, id LIMIT :limit"
            ),
            params,
        )
    ).all()
    items = [_installation(row) for row in rows[:limit]]
    last = items[-1] if len(rows) > limit else None
    return FleetPage(
        items=items,
        next_after=(
            (last.tenant_id, last.plugin_name, last.plugin_version, last.id) if last else None
        ),
    )


async def count_by_health(
    session: AsyncSession,
    *,
    tenant: str | None = None,
    plugin: str | None = None,
    version: str | None = None,
    tenants: list[str] | None = None,
) -> dict[str, int]:
    """How many installations matching the filters (in the reader's scope, `tenants`) have
    each health word (all pages; every word present, 0 when none)."""
    conditions, params = _filters(tenant, plugin, version, tenants)
    rows = await session.execute(
        text(
            f"SELECT health, count(*) AS n FROM ({_FLEET_SQL}) f"
            f" WHERE {' AND '.join(conditions)} GROUP BY health"
        ),
        params,
    )
    counts: dict[str, int] = dict.fromkeys(HEALTHS, 0)
    counts.update({row.health: row.n for row in rows})
    return counts


async def installation_detail(
    session: AsyncSession,
    installation_id: uuid.UUID,
    *,
    heartbeats: int = RECENT_HEARTBEATS,
    tenants: list[str] | None = None,
) -> InstallationDetail | None:
    """One installation with its newest `heartbeats` samples and its version history. The
    history comes from the stored heartbeats' `plugin_version` (what the plugin said it ran,
    so also changes made outside the loop), not from the attempts (which say what was asked
    for, not what ran); it reaches back as far as heartbeats are kept. None when there is no
    such installation of `tenants` (the reader's scope; None: every tenant)."""
    conditions, params = _filters(None, None, None, tenants)
    row = (
        await session.execute(
            text(f"SELECT * FROM ({_FLEET_SQL}) f WHERE id = :id AND {' AND '.join(conditions)}"),
            {"id": installation_id, **params},
        )
    ).first()
    if row is None:
        return None
    samples = await session.execute(
        text(
            "SELECT received_at, plugin_version, requests, errors, webhook_attempts,"
            " webhook_failures, latency_p95_ms FROM plugin_heartbeats"
            " WHERE installation_id = :id ORDER BY received_at DESC, id DESC LIMIT :n"
        ),
        {"id": installation_id, "n": heartbeats},
    )
    points = [
        HeartbeatPoint(
            received_at=s.received_at,
            plugin_version=s.plugin_version,
            requests=s.requests,
            errors=s.errors,
            webhook_attempts=s.webhook_attempts,
            webhook_failures=s.webhook_failures,
            latency_p95_ms=float(s.latency_p95_ms)
            if isinstance(s.latency_p95_ms, Decimal)
            else s.latency_p95_ms,
        )
        for s in samples
    ]
    points.reverse()
    # Gaps and islands: consecutive heartbeats of one version share (overall rank - rank
    # within the version).
    runs = await session.execute(
        text(
            "SELECT plugin_version, min(received_at) AS first_seen,"
            " max(received_at) AS last_seen, count(*) AS n FROM ("
            "  SELECT plugin_version, received_at,"
            "   row_number() OVER (ORDER BY received_at, id)"
            "   - row_number() OVER (PARTITION BY plugin_version ORDER BY received_at, id) AS run"
            "  FROM plugin_heartbeats WHERE installation_id = :id) h"
            " GROUP BY plugin_version, run ORDER BY min(received_at)"
        ),
        {"id": installation_id},
    )
    return InstallationDetail(
        installation=_installation(row),
        previous_version=row.previous_version,
        version_changed_at=row.version_changed_at,
        known_good_at=row.known_good_at,
        heartbeat_count=row.heartbeat_count,
        created_at=row.created_at,
        heartbeats=points,
        versions=[
            VersionSpan(
                version=r.plugin_version,
                first_seen=r.first_seen,
                last_seen=r.last_seen,
                heartbeats=r.n,
            )
            for r in runs
        ],
    )


class HeartbeatSummary(BaseModel):
    """Heartbeats of one installation summed up: the baseline before an incident, or the
    heartbeats between its first bad signal and its detection."""

    heartbeats: int
    first_at: datetime | None
    last_at: datetime | None
    requests: int
    errors: int
    webhook_attempts: int
    webhook_failures: int

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def webhook_fail_rate(self) -> float | None:
        return self.webhook_failures / self.webhook_attempts if self.webhook_attempts else None


async def heartbeat_summary(
    session: AsyncSession,
    installation_id: uuid.UUID,
    *,
    before: datetime,
    since: datetime | None = None,
    limit: int = 10,
) -> HeartbeatSummary:
    """The installation's last `limit` heartbeats received before `before` (and at or after
    `since` when given), summed: requests, errors, webhook attempts and failures."""
    row = (
        await session.execute(
            text(
                "SELECT count(*) AS heartbeats, min(received_at) AS first_at,"
                " max(received_at) AS last_at,"
                " coalesce(sum(requests), 0) AS requests, coalesce(sum(errors), 0) AS errors,"
                " coalesce(sum(webhook_attempts), 0) AS webhook_attempts,"
                " coalesce(sum(webhook_failures), 0) AS webhook_failures"
                " FROM (SELECT received_at, requests, errors, webhook_attempts, webhook_failures"
                "  FROM plugin_heartbeats WHERE installation_id = :id AND received_at < :before"
                "   AND (CAST(:since AS timestamptz) IS NULL OR received_at >= :since)"
                "  ORDER BY received_at DESC LIMIT :limit) last"
            ),
            {"id": installation_id, "before": before, "since": since, "limit": limit},
        )
    ).one()
    return HeartbeatSummary.model_validate(dict(row._mapping))
