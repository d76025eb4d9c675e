"""The state machine is declared once (app/core/states.py); the database holds its own copy in
CHECK constraints, partial indexes and a trigger, written out by the migrations. These tests
read the migrated database's definitions back and prove the two agree, so that adding a
status to the enum without a migration (or the reverse) fails here, not in production."""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors

from app.core.states import (
    ATTEMPT_FINISHED,
    ATTEMPT_IN_FLIGHT,
    CHANGES,
    INCIDENT_CLOSED,
    INCIDENT_OPEN,
    AttemptStatus,
    IncidentStatus,
)

QUOTED = re.compile(r"'([a-z_]+)'")


def constraint(conn: psycopg.Connection[Any], table: str, name: str) -> list[str]:
    row = conn.execute(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = %s::regclass AND c.conname = %s",
        (table, name),
    ).fetchone()
    assert row is not None, f"no constraint {name} on {table}"
    return QUOTED.findall(row[0])


def index_predicate(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute("SELECT pg_get_indexdef(%s::regclass)", (name,)).fetchone()
    assert row is not None
    where = row[0].split(" WHERE ", 1)
    assert len(where) == 2, f"{name} is not a partial index: {row[0]}"
    return where[1]


def test_the_groups_partition_the_statuses():
    assert set(INCIDENT_OPEN) | set(INCIDENT_CLOSED) == set(IncidentStatus)
    assert not set(INCIDENT_OPEN) & set(INCIDENT_CLOSED)
    assert set(ATTEMPT_IN_FLIGHT) | set(ATTEMPT_FINISHED) == set(AttemptStatus)
    assert not set(ATTEMPT_IN_FLIGHT) & set(ATTEMPT_FINISHED)


def test_check_constraints_list_exactly_the_enums(db):
    assert constraint(db, "plugin_incidents", "ck_plugin_incidents_status") == list(IncidentStatus)
    assert constraint(db, "plugin_autopatch_attempts", "ck_plugin_autopatch_attempts_status") == (
        list(AttemptStatus)
    )
    assert constraint(db, "plugin_autopatch_attempts", "ck_plugin_autopatch_attempts_action") == (
        list(CHANGES)
    )


@pytest.mark.parametrize(
    "index",
    [
        "uq_plugin_incidents_open_per_type",
        "uq_plugin_incidents_open_fleet",
        "ix_plugin_incidents_open_members",
    ],
)
def test_open_incident_indexes_exclude_exactly_the_closed_statuses(db, index):
    predicate = index_predicate(db, index)
    assert "<> ALL" in predicate, predicate  # NOT IN (...)
    assert QUOTED.findall(predicate) == list(INCIDENT_CLOSED)


def test_in_flight_attempt_index_and_trigger_use_the_in_flight_statuses(db):
    predicate = index_predicate(db, "uq_plugin_autopatch_attempts_in_flight")
    assert QUOTED.findall(predicate) == list(ATTEMPT_IN_FLIGHT)
    row = db.execute(
        "SELECT pg_get_functiondef('selfheal_guard_attempt_update'::regproc)"
    ).fetchone()
    assert row is not None
    in_flight = ", ".join(f"'{s}'" for s in ATTEMPT_IN_FLIGHT)
    # The trigger refuses a status going back along this order.
    assert row[0].count(f"ARRAY[{in_flight}]") == 2, row[0]


def test_a_misspelt_status_typed_in_psql_is_refused(db):
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    db.execute("INSERT INTO tenants (id) VALUES (%s)", (tenant,))
    installation = db.execute(
        "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version)"
        " VALUES (%s, 'payments', '1.2.2') RETURNING id",
        (tenant,),
    ).fetchone()[0]
    incident = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity) VALUES (%s, %s, 'payments', '1.2.2', 'error_spike', 'low')"
        " RETURNING id",
        (installation, tenant),
    ).fetchone()[0]
    with pytest.raises(errors.CheckViolation, match="ck_plugin_incidents_status"):
        db.execute("UPDATE plugin_incidents SET status = 'resolvd' WHERE id = %s", (incident,))
