"""Which incidents a heal tick claims when more are due than it has room for: the oldest first,
a new incident counting as due since its detection (app/healing/repository.py, claim_due), so
that under a burst every incident waits its turn instead of a lottery among the due ones."""

from __future__ import annotations

import uuid
from typing import Any

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.healing.repository import claim_due
from tests.support.plugins import Plugin, register


def add_incident(
    db: Any, plugin: Plugin, *, status: str, detected_ago_s: int, due_ago_s: int | None
) -> uuid.UUID:
    row = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity, status, detected_at, next_check_at) VALUES (%s, %s, %s, '1.2.2',"
        " 'error_spike', 'medium', %s, now() - make_interval(secs => %s),"
        " now() - make_interval(secs => %s)) RETURNING id",
        (plugin.id, plugin.tenant, plugin.name, status, detected_ago_s, due_ago_s),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


async def claim(settings: Settings, limit: int) -> list[tuple[uuid.UUID, bool]]:
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            return await claim_due(session, lease_s=30, limit=limit)
    finally:
        await engine.dispose()


async def test_a_burst_is_claimed_oldest_first_new_incidents_included(settings, db):
    plugins = [await register(settings, tenant=f"burst-{n}") for n in range(10)]
    # Inserted newest first, so that the table's own order is the reverse of the due order.
    # Two new incidents detected just now.
    fresh = [
        add_incident(db, p, status="detected", detected_ago_s=0, due_ago_s=None)
        for p in plugins[8:]
    ]
    # Five incidents in a step, due 60-64 s ago (detected earlier still).
    due = [
        add_incident(db, p, status="deciding", detected_ago_s=900, due_ago_s=60 + n)
        for n, p in enumerate(plugins[3:8])
    ][::-1]
    # Three new incidents detected 10 minutes ago, never looked at yet.
    old_new = [
        add_incident(db, p, status="detected", detected_ago_s=600, due_ago_s=None)
        for p in plugins[:3]
    ]

    first = await claim(settings, 4)
    assert [i for i, _ in first] and {i for i, _ in first} == {*old_new, due[0]}
    assert {i for i, is_new in first if is_new} == set(old_new)

    second = await claim(settings, 4)
    assert {i for i, _ in second} == set(due[1:5])
    assert not any(is_new for _, is_new in second)

    third = await claim(settings, 4)
    assert {i for i, _ in third} == set(fresh)
    assert all(is_new for _, is_new in third)

    # Everything is leased now: nothing is due until the leases run out.
    assert await claim(settings, 4) == []
