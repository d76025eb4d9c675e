"""What happens when parts fail: an undecryptable secret, a database connection that dies
silently or loudly, a change announced while a credential load is in flight, a database that
is stuck while an ack is processed. The answer must be a bounded 503 or a correct answer,
never a hang, a 500 or a credential that outlives its revocation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import psycopg
from psycopg import errors as pg_errors

from app.core.crypto import SecretBox
from app.core.settings import libpq_url
from tests.support.api import serve
from tests.support.plugins import register, send_heartbeat
from tests.support.processes import running_worker
from tests.support.settings import as_login, make_settings


async def test_secret_sealed_with_another_key_disables_only_that_key(settings, db):
    a = await register(settings, tenant="t-a")
    b = await register(settings, tenant="t-b")
    c = await register(settings, tenant="t-c")
    # An old secret of b, still in its grace period, sealed before SELFHEAL_SECRET_KEY changed.
    old_box = SecretBox("a-different-key-0123456789abcdef0123456789")
    db.execute(
        "INSERT INTO plugin_secrets (installation_id, secret_enc, expires_at)"
        " VALUES (%s, %s, now() + interval '1 day')",
        (b.id, old_box.seal("shs_old", bound_to=b.id)),
    )
    async with serve(settings) as (app, client):
        assert (await send_heartbeat(client, a)).status_code == 200
        assert (await send_heartbeat(client, b)).status_code == 200  # its readable key works
        assert (await send_heartbeat(client, c)).status_code == 200  # the loader lives on
        assert not app.state.services.authenticator._loader._runner.done()


async def test_disable_announced_while_a_load_is_in_flight_is_not_lost(settings, db):
    plugin = await register(settings)
    async with serve(settings) as (app, client):
        loader = app.state.services.authenticator._loader
        real_query = loader._query
        release = asyncio.Event()

        async def slow_query(ids):
            found = await real_query(ids)  # read while the plugin was still active
            await release.wait()
            return found

        loader._query = slow_query
        in_flight = asyncio.create_task(send_heartbeat(client, plugin))
        await asyncio.sleep(0.3)
        db.execute("UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (plugin.id,))
        await asyncio.sleep(0.5)  # the NOTIFY arrives while the stale read is still pending
        loader._query = real_query
        release.set()
        await in_flight
        later = await send_heartbeat(client, plugin)
        assert later.status_code == 401
        assert later.json()["error"]["code"] == "plugin_disabled"


async def test_database_error_in_the_one_by_one_fallback_is_503_not_500(settings, plugin):
    async with serve(settings) as (app, _):
        batcher = app.state.services.batcher
        calls = []

        async def failing_store(conn, batch):
            calls.append(len(batch))
            if len(calls) == 1:
                raise pg_errors.ForeignKeyViolation("fk")
            raise pg_errors.QueryCanceled("canceling statement due to statement timeout")

        batcher._store = failing_store
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await send_heartbeat(client, plugin)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable"
    assert response.headers["retry-after"] == "5"


async def test_ack_refused_with_503_can_be_resent_unchanged(
    database_url, servers, redis_prefix, db
):
    settings = make_settings(database_url, servers.redis_url, redis_prefix, db_timeout_s=1)
    plugin = await register(settings)
    command = db.execute(
        "INSERT INTO plugin_agent_commands (installation_id, type, expires_at)"
        " VALUES (%s, 'config', now() + interval '1 hour') RETURNING id",
        (plugin.id,),
    ).fetchone()[0]
    path = f"/api/plugins/commands/{command}/ack"
    body = b'{"result": {"ok": true}}'
    headers = plugin.headers(body, path)
    async with serve(settings) as (_, client):
        with psycopg.connect(libpq_url(database_url)) as locker:
            locker.execute(
                "SELECT 1 FROM plugin_agent_commands WHERE id = %s FOR UPDATE", (command,)
            )
            stuck = await client.post(path, content=body, headers=headers)
            locker.rollback()
        again = await client.post(path, content=body, headers=headers)
        replay = await client.post(path, content=body, headers=headers)
    assert stuck.status_code == 503, stuck.text
    assert again.status_code == 200, again.text
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "replay"


def terminate(db, application_name: str) -> int:
    return len(
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (application_name,),
        ).fetchall()
    )


async def eventually_status(client, plugin, status: int, within_s: float) -> list[int]:
    seen: list[int] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        response = await send_heartbeat(client, plugin)
        seen.append(response.status_code)
        if response.status_code == status:
            return seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"never {status} within {within_s} s: {seen}")


async def test_api_recovers_after_its_database_connections_are_killed(settings, db):
    plugin = await register(settings, tenant="t-a")
    fresh = await register(settings, tenant="t-b")
    async with serve(settings) as (_, client):
        assert (await send_heartbeat(client, plugin)).status_code == 200
        await asyncio.sleep(0.3)
        killed = sum(
            terminate(db, name)
            for name in ("selfheal-api-ingest", "selfheal-api-auth", "selfheal-api-listen")
        )
        assert killed == 3
        # Dead connections are replaced and the work sent again: the plugins see nothing.
        for _ in range(3):
            response = await send_heartbeat(client, plugin)
            assert response.status_code == 200, response.text
        response = await send_heartbeat(client, fresh)  # a credential load, on a new connection
        assert response.status_code == 200, response.text
        # The LISTEN connection came back: a change made in psql is still seen at once.
        await asyncio.sleep(1.5)
        db.execute("UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (plugin.id,))
        await eventually_status(client, plugin, 401, within_s=2)


class BlackholeProxy:
    """TCP proxy to PostgreSQL that can make its existing connections go silent (no FIN, no
    RST), as after a failover or a dropped link, while new connections still work."""

    def __init__(self) -> None:
        self.connections: list[object] = []
        self.silenced: set[object] = set()
        self.pumps: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", 5432)
        self.writers += [client_writer, server_writer]
        me = object()
        self.connections.append(me)

        async def pump(reader, writer) -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    if me in self.silenced:
                        await asyncio.sleep(3600)
                    writer.write(data)
                    await writer.drain()
            if me not in self.silenced:
                writer.close()

        await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))

    def silence_existing(self) -> None:
        self.silenced.update(self.connections)


@contextlib.asynccontextmanager
async def blackhole_proxy() -> AsyncIterator[tuple[BlackholeProxy, int]]:
    proxy = BlackholeProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield proxy, port
    finally:
        server.close()
        for task in asyncio.all_tasks():
            if task.get_coro().__qualname__.startswith("BlackholeProxy"):
                task.cancel()
        # Every socket closed here, not left to the garbage collector (whose ResourceWarning
        # would land in whichever test runs then).
        for writer in proxy.writers:
            writer.close()
        for writer in proxy.writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def test_silently_dead_database_connections_are_replaced(
    database_url, servers, redis_prefix, db
):
    if "127.0.0.1:5432" not in database_url:
        import pytest

        pytest.skip("needs the machine's PostgreSQL on 127.0.0.1:5432 to proxy")
    direct = make_settings(database_url, servers.redis_url, redis_prefix)
    plugin = await register(direct, tenant="t-a")
    fresh = await register(direct, tenant="t-b")
    async with blackhole_proxy() as (proxy, port):
        proxied = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
        settings = make_settings(proxied, servers.redis_url, redis_prefix, db_timeout_s=1)
        async with serve(settings) as (_, client):
            assert (await send_heartbeat(client, plugin)).status_code == 200
            proxy.silence_existing()
            started = time.monotonic()
            # Each silent connection costs one client-side timeout (statement timeout + 1 s),
            # then the work is sent again on a new connection.
            response = await send_heartbeat(client, plugin)
            assert response.status_code == 200, response.text
            response = await send_heartbeat(client, fresh)
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 8


async def test_health_does_not_reveal_connection_details(database_url, servers, redis_prefix):
    settings = make_settings(database_url, servers.redis_url, redis_prefix).model_copy(
        update={"database_url": as_login(database_url, "nosuchuser", "no-such-password")}
    )
    async with serve(settings) as (_, client):
        response = await client.get("/health")
    assert response.status_code == 503
    postgres = response.json()["components"]["postgres"]
    assert postgres["status"] == "down"
    assert "nosuchuser" not in response.text and "no-such-password" not in response.text
    assert postgres["error"] == "OperationalError"


async def test_health_is_degraded_while_credential_changes_are_not_followed(settings, db):
    async with serve(settings) as (app, client), running_worker(settings):
        assert (await client.get("/health")).json()["status"] == "ok"
        terminate(db, "selfheal-api-listen")
        await asyncio.sleep(0.2)
        body = (await client.get("/health")).json()
        assert body["status"] == "degraded"
        assert body["components"]["credential_changes"] == {"status": "down"}
        assert app.state.services.authenticator.cache_ttl_s == 5.0
        assert await app.state.services.authenticator.wait_until_listening(timeout_s=3.0)
        assert (await client.get("/health")).json()["status"] == "ok"
