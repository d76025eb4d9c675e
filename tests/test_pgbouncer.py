"""selfheal behind a real PgBouncer in transaction pooling mode (docs/scaling.md, "PgBouncer
(transaction pooling)"): DATABASE_URL is the pooler, SELFHEAL_DB_POOLER=transaction, a pool of
3 server connections shared by every client of the application's login (9 in our runs: the
API's and the worker's engines, the ingest and credential connections).

- The control plane as processes (`selfheal api`, `selfheal worker`, the reference services),
  with DATABASE_DIRECT_URL for the API's LISTEN: plugins registered through the pooler send
  signed heartbeats (stored), a sick one gets its incident from the worker, which escalates
  it (no release to patch to: the healing step ran through the pooler), the ops API
  answers, a secret rotated by `selfheal plugin rotate-secret` (through the pooler too) is
  honoured at once (the NOTIFY reaches the API on its direct connection), /health is ok, the
  history is sealed and verified by the CLI, and PostgreSQL never saw more than the pool's
  server connections from the pooled clients.
- Without DATABASE_DIRECT_URL (the degraded mode): nothing LISTENs through the pooler, /health
  says credential changes are not followed, credentials are kept 5 s at most, and a disabled
  installation is refused within that bound.

Without /usr/sbin/pgbouncer the tests skip, saying why; with SELFHEAL_PGBOUNCER_TESTS=required
(.ci/run sets it, after installing Debian's pgbouncer) they fail instead. Every wait is bounded
polling."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import text

from app.core.db import create_engine
from app.core.settings import Settings
from tests.support.api import serve
from tests.support.control_plane import (
    SELFHEAL,
    ControlPlane,
    at_defaults,
    control_plane_processes,
)
from tests.support.detection import beat
from tests.support.personas import make_user
from tests.support.pgbouncer import (
    REQUIRED,
    PgBouncer,
    pgbouncer_unavailable,
    running_pgbouncer,
)
from tests.support.plugins import Plugin, register, send_heartbeat
from tests.support.settings import APP_LOGIN, APP_PASSWORD, REPO

pytestmark = pytest.mark.timeout(300)

POOL_SIZE = 3


@pytest.fixture
def pgbouncer(settings: Settings) -> Iterator[PgBouncer]:
    reason = pgbouncer_unavailable()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"SELFHEAL_PGBOUNCER_TESTS=required, and {reason}")
        pytest.skip(reason)
    assert settings.database_url
    with running_pgbouncer(
        settings.database_url, {APP_LOGIN: APP_PASSWORD}, pool_size=POOL_SIZE
    ) as bouncer:
        yield bouncer


def behind(settings: Settings, bouncer: PgBouncer, *, direct: bool) -> Settings:
    """The application's login through the pooler; its direct URL (for LISTEN) when `direct`.
    The migrations' owner URL stays direct, as the tests' fixtures made the database with it."""
    assert settings.database_url
    return settings.model_copy(
        update={
            "database_url": bouncer.through(settings.database_url),
            "db_pooler": "transaction",
            "database_direct_url": settings.database_url if direct else None,
        }
    )


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    """Poll `check` until it holds; the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, f"{what} within {timeout_s:g} s"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def pooled_backends(db: Any, settings: Settings) -> int:
    """Server connections of the application's login on the test database, but for the
    API's direct LISTEN connection."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = current_database()"
        " AND application_name <> 'selfheal-api-listen'",
        (APP_LOGIN,),
    ).fetchone()
    return int(row[0])


def incidents_of(db: Any, plugin: Plugin) -> list[tuple[str, str]]:
    return [
        (row[0], row[1])
        for row in db.execute(
            "SELECT type, status FROM plugin_incidents WHERE installation_id = %s",
            (plugin.id,),
        ).fetchall()
    ]


@pytest.fixture
def pooled(settings: Settings, pgbouncer: PgBouncer, tmp_path: Path) -> Settings:
    return at_defaults(behind(settings, pgbouncer, direct=True), tmp_path)


@pytest.fixture
def control_plane(pooled: Settings) -> Iterator[ControlPlane]:
    with control_plane_processes(pooled) as plane:
        yield plane


async def test_api_and_worker_work_behind_pgbouncer_in_transaction_mode(
    pooled, pgbouncer, control_plane, db
):
    plane = control_plane
    fleet = [await register(pooled, tenant=f"merchant-{n}", name="payments") for n in range(6)]
    healthy = fleet[0]
    sick = await register(pooled, tenant="merchant-9", name="erp_crm")
    ops = await make_user(pooled, "otto", "operator")
    async with httpx.AsyncClient(base_url=plane.url, timeout=10) as client:
        # Signed heartbeats of every plugin at once: the API's ingest batches and credential
        # loads share the pool's server connections with the worker's ticks.
        for _ in range(3):
            await asyncio.gather(
                *(beat(client, plugin) for plugin in fleet),
                beat(client, sick, webhook_attempts=50, webhook_failures=30),
            )
        stored = db.execute(
            "SELECT installation_id::text, count(*) FROM plugin_heartbeats GROUP BY 1"
        ).fetchall()
        assert dict(stored) == {plugin.id: 3 for plugin in [*fleet, sick]}

        # Detection, then the healing loop's first step (the incident's row locked, the
        # decision service asked outside the transaction, its answer recorded): no release
        # exists to patch to, so it escalates to a human.
        async def sick_is_escalated() -> bool:
            return incidents_of(db, sick) == [("webhook_fail_rate", "escalated")]

        await until("the sick plugin's incident, escalated", sick_is_escalated, 120)
        assert all(incidents_of(db, plugin) == [] for plugin in fleet)

        # The ops API (the ORM engine, a statement timeout per transaction).
        for _ in range(8):  # more runs than psycopg's prepare threshold (5)
            listed = await client.get("/api/ops/plugin-incidents", headers=ops.auth)
            assert listed.status_code == 200, listed.text
        assert [i["installation_id"] for i in listed.json()["items"]] == [sick.id]

        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok", health.text
        assert health.json()["components"]["credential_changes"] == {"status": "ok"}

        # A secret rotated without grace (the CLI, through the pooler): the old one is refused
        # as soon as the change commits, since the API LISTENs on its direct connection (the
        # cache would otherwise keep it SELFHEAL_AUTH_CACHE_TTL_S, 600 s).
        assert (await send_heartbeat(client, healthy)).status_code == 200
        rotated = subprocess.run(
            [*SELFHEAL, "plugin", "rotate-secret", healthy.id, "--grace-s", "0", "--json"],
            env=plane.env,
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
        assert rotated.returncode == 0, rotated.stderr.decode()
        new_secret = orjson.loads(rotated.stdout)["secret"]

        async def old_secret_refused() -> bool:
            response = await send_heartbeat(client, healthy)
            assert response.status_code in (200, 401, 429), response.text
            return response.status_code == 401

        await until("the old secret to be refused", old_secret_refused, 10)
        renewed = Plugin(healthy.id, new_secret, healthy.tenant, healthy.name)
        assert (await send_heartbeat(client, renewed)).status_code == 200

    # The history sealed and verified through the pooler (a REPEATABLE READ snapshot, whose
    # SET TRANSACTION follows the per-transaction timeout), by the CLI as an operator runs it.
    for command in (["audit", "seal", "--json"], ["audit", "verify", "--json"]):
        ran = subprocess.run(
            [*SELFHEAL, *command], env=plane.env, cwd=REPO, capture_output=True, timeout=120
        )
        assert ran.returncode == 0, (command, ran.stdout.decode(), ran.stderr.decode())

        # The API's and the worker's connections (engine pools, ingest, credential loads) are
        # more than the pool's server connections: they really share them.
        pool = pgbouncer.pool(pooled.database_url)
        print(f"\npgbouncer pool after the run: {pool}")
        assert pool["cl_active"] + pool["cl_waiting"] > POOL_SIZE
        assert pool["sv_active"] + pool["sv_idle"] + pool["sv_used"] <= POOL_SIZE
        assert pooled_backends(db, pooled) <= POOL_SIZE
    assert "prepared statement" not in pgbouncer.log


async def test_without_a_direct_url_credential_changes_are_bounded_by_the_short_cache(
    settings, pgbouncer, db
):
    pooled = behind(settings, pgbouncer, direct=False)
    plugin = await register(pooled)
    # The ORM's transactions carry the statement timeout PgBouncer would not take as a startup
    # option, and only for themselves (SET LOCAL: nothing left on the shared server session).
    engine = create_engine(pooled, role="test")
    try:
        for _ in range(2 * POOL_SIZE):
            async with engine.connect() as conn:
                timeout = (await conn.execute(text("SHOW statement_timeout"))).scalar()
                assert timeout == f"{pooled.db_timeout_s:g}s"
        async with engine.connect() as conn:
            await conn.execute(text("COMMIT"))  # out of the transaction, on a pooled session
            assert (await conn.execute(text("SHOW statement_timeout"))).scalar() == "0"
    finally:
        await engine.dispose()
    async with serve(pooled) as (app, client):
        assert (await send_heartbeat(client, plugin)).status_code == 200
        body = (await client.get("/health")).json()
        assert body["components"]["postgres"]["status"] == "ok"
        assert body["components"]["credential_changes"] == {"status": "down"}
        authenticator = app.state.services.authenticator
        assert not authenticator.listening
        assert authenticator.cache_ttl_s == 5.0
        db.execute("UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (plugin.id,))

        async def refused() -> bool:
            response = await send_heartbeat(client, plugin)
            assert response.status_code in (200, 401), response.text
            return response.status_code == 401

        # Within the 5 s bound (and a second's reload), with room for a slow machine.
        await until("the disabled installation to be refused", refused, 20)
    # Nothing LISTENed anywhere.
    assert (
        db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'selfheal-api-listen'"
            " AND datname = current_database()"
        ).fetchone()[0]
        == 0
    )
