"""The ops read side from a test: a session to call the queries with (`reading`), and rows put
in place the way an operator in psql would (incidents, attempts, votes, releases, maintenance
windows), with their times relative to the database's now()."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import psycopg
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings

Db = psycopg.Connection[Any]


@contextlib.asynccontextmanager
async def reading(settings: Settings) -> AsyncIterator[AsyncSession]:
    """One session in one transaction, as a handler's `transaction(request)` gives."""
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


def add_incident(
    db: Db,
    installation_id: str,
    *,
    tenant: str = "merchant-1",
    plugin: str = "payments",
    severity: str = "medium",
    status: str = "detected",
    incident_type: str = "error_spike",
    detected_ago_s: float = 60,
    first_bad_before_s: float | None = None,
    resolved_after_s: float | None = None,
    decision: dict[str, Any] | None = None,
    decided_ago_s: float | None = None,
) -> str:
    """An incident detected `detected_ago_s` ago (its first bad signal `first_bad_before_s`
    earlier, resolved `resolved_after_s` after detection, decided `decided_ago_s` ago with
    the `decision` recorded as sira_decision); its id."""
    row = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, type, severity,"
        " status, detected_at, first_bad_signal_at, resolved_at, sira_decision, decided_at)"
        " VALUES (%(inst)s, %(tenant)s, %(plugin)s, %(type)s, %(severity)s, %(status)s,"
        "  now() - make_interval(secs => %(ago)s),"
        "  now() - make_interval(secs => %(ago)s + %(bad)s),"
        "  now() - make_interval(secs => %(ago)s) + make_interval(secs => %(resolved)s),"
        "  CAST(%(decision)s AS jsonb), now() - make_interval(secs => %(decided)s))"
        " RETURNING id::text",
        {
            "inst": installation_id,
            "tenant": tenant,
            "plugin": plugin,
            "type": incident_type,
            "severity": severity,
            "status": status,
            "ago": detected_ago_s,
            "bad": first_bad_before_s,
            "resolved": resolved_after_s,
            "decision": None if decision is None else orjson.dumps(decision).decode(),
            "decided": decided_ago_s,
        },
    ).fetchone()
    assert row is not None
    return str(row[0])


def add_attempt(
    db: Db,
    *,
    incident_id: str | None,
    installation_id: str,
    status: str = "success",
    action: str = "patch",
    to_version: str = "1.2.3",
    source: str | None = "sira",
    confidence: float | None = None,
    executed_ago_s: float = 0,
    staging_report: dict[str, Any] | None = None,
    verify_in_s: float | None = None,
) -> str:
    """An attempt inserted with its status, executed `executed_ago_s` ago (the event log
    records the insert; executed_at cannot be changed afterwards), with its staging report
    and a verification deadline `verify_in_s` from now; its id."""
    row = db.execute(
        "INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, action,"
        " from_version, to_version, status, decision_source, confidence, executed_at,"
        " staging_report, verify_deadline_at)"
        " VALUES (%s, %s, %s, '1.2.2', %s, %s, %s, %s, now() - make_interval(secs => %s),"
        "  CAST(%s AS jsonb), now() + make_interval(secs => %s))"
        " RETURNING id::text",
        (
            incident_id,
            installation_id,
            action,
            to_version,
            status,
            source,
            confidence,
            executed_ago_s,
            None if staging_report is None else orjson.dumps(staging_report).decode(),
            verify_in_s,
        ),
    ).fetchone()
    assert row is not None
    return str(row[0])


def add_vote(
    db: Db, incident_id: str, username: str, *, action_key: str, after_decision_s: float
) -> None:
    """`username`'s approval of `action_key`, cast `after_decision_s` after the incident's
    decided_at."""
    db.execute(
        "INSERT INTO approvals (incident_id, user_id, action_key, created_at, expires_at)"
        " SELECT i.id, u.id, %s, i.decided_at + make_interval(secs => %s), now() + interval '1 h'"
        " FROM plugin_incidents i, ops_users u WHERE i.id = %s AND u.username = %s",
        (action_key, after_decision_s, incident_id, username),
    )


def add_release(db: Db, plugin: str, version: str, *, quarantined: bool = False) -> None:
    """A release row (not signed for real: the read side does not check signatures)."""
    db.execute(
        "INSERT INTO plugin_releases (plugin_name, version, artifact_url, sha256, signature,"
        " signed_statement, quarantined_at, quarantine_reason)"
        " VALUES (%s, %s, 'https://artifacts.test/x.zip', %s, 'sig', 'statement',"
        "  CASE WHEN %s THEN now() END, CASE WHEN %s THEN 'rolled back twice' END)",
        (plugin, version, "a" * 64, quarantined, quarantined),
    )


def add_window(
    db: Db,
    *,
    tenant: str | None = None,
    installation_id: str | None = None,
    starts_in_s: float = -60,
    lasts_s: float = 3600,
    reason: str = "deploying",
) -> str:
    """A maintenance window for a tenant or an installation starting `starts_in_s` from now
    (negative: already open) and lasting `lasts_s`, opened by user:otto; its id."""
    row = db.execute(
        "INSERT INTO maintenance_windows (tenant_id, installation_id, starts_at, ends_at,"
        " reason, created_by)"
        " VALUES (%(tenant)s, %(inst)s, now() + make_interval(secs => %(starts)s),"
        "  now() + make_interval(secs => %(starts)s + %(lasts)s), %(reason)s, 'user:otto')"
        " RETURNING id::text",
        {
            "tenant": tenant,
            "inst": installation_id,
            "starts": starts_in_s,
            "lasts": lasts_s,
            "reason": reason,
        },
    ).fetchone()
    assert row is not None
    return str(row[0])


def add_command(
    db: Db,
    attempt_id: str,
    *,
    command_type: str = "update",
    version: str = "1.2.3",
    status: str = "pending",
    error: str | None = None,
    deliveries: int = 0,
    ago_s: float = 30,
) -> str:
    """A command queued for the attempt's installation `ago_s` ago, in `status`: acked or
    failed (with `error`) at now(); its id."""
    row = db.execute(
        "INSERT INTO plugin_agent_commands (installation_id, attempt_id, type, payload, status,"
        " created_at, expires_at, delivered_at, delivery_count, acked_at, failed_at, error)"
        " SELECT a.installation_id, a.id, %(type)s, jsonb_build_object('version', CAST(%(version)s AS text)),"
        "  CAST(%(status)s AS text), now() - make_interval(secs => %(ago)s), now() + interval '1 h',"
        "  CASE WHEN CAST(%(deliveries)s AS integer) > 0 THEN now() END, %(deliveries)s,"
        "  CASE WHEN CAST(%(status)s AS text) = 'acked' THEN now() END,"
        "  CASE WHEN CAST(%(status)s AS text) = 'failed' THEN now() END, CAST(%(error)s AS text)"
        " FROM plugin_autopatch_attempts a WHERE a.id = %(attempt)s"
        " RETURNING id::text",
        {
            "type": command_type,
            "version": version,
            "status": status,
            "ago": ago_s,
            "deliveries": deliveries,
            "error": error,
            "attempt": attempt_id,
        },
    ).fetchone()
    assert row is not None
    return str(row[0])


def add_heartbeat(
    db: Db,
    installation_id: str,
    *,
    ago_s: float,
    requests: int = 1000,
    errors: int = 0,
    webhook_attempts: int = 0,
    webhook_failures: int = 0,
) -> None:
    """A heartbeat sample received `ago_s` ago (as ingest stores it, without the request), signed
    as it was received (migration 0017: signed_at is the partition key)."""
    db.execute(
        "INSERT INTO plugin_heartbeats (installation_id, received_at, signed_at, plugin_version,"
        " env, requests, errors, webhook_attempts, webhook_failures, msg_digest)"
        " VALUES (%s, now() - make_interval(secs => %s), now() - make_interval(secs => %s),"
        "  '1.2.2', 'prod', %s, %s, %s, %s,"
        "  decode(md5(random()::text || clock_timestamp()::text), 'hex'))",
        (installation_id, ago_s, ago_s, requests, errors, webhook_attempts, webhook_failures),
    )
