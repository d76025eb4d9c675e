"""Heartbeats are answered before FastAPI's stack (app/plugins/fastpath.py, SelfhealAPI), or,
when chunked, through the whole stack: either way they get what every request gets from
RequestContextMiddleware (request id, latency histogram under the route template) and the
same answers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from tests.support.api import serve
from tests.support.faults import until
from tests.support.plugins import HEARTBEAT, Plugin, heartbeat_body, register, send_heartbeat
from tests.test_health_metrics import sample


def _count(text: str, status: str) -> float:
    return (
        sample(
            text,
            "selfheal_http_request_duration_seconds_count",
            method="POST",
            route=HEARTBEAT,
            status=status,
        )
        or 0.0
    )


async def test_a_heartbeat_carries_a_request_id_and_is_timed_under_its_route(
    client: Any, plugin: Plugin
) -> None:
    before = (await client.get("/metrics")).text
    accepted = await send_heartbeat(client, plugin)
    assert accepted.status_code == 200, accepted.text
    assert re.fullmatch(r"[0-9a-f]{32}", accepted.headers["x-request-id"])
    # A header of the plugin's own is echoed, cut to 64 characters.
    body = heartbeat_body(uptime_s=5)
    headers = {**plugin.headers(body, HEARTBEAT), "X-Request-ID": "hb-trace-1"}
    echoed = await client.post(HEARTBEAT, content=body, headers=headers)
    assert echoed.status_code == 200, echoed.text
    assert echoed.headers["x-request-id"] == "hb-trace-1"
    body = heartbeat_body(uptime_s=7)
    headers = {**plugin.headers(body, HEARTBEAT), "X-Request-ID": "r" * 100}
    long_id = await client.post(HEARTBEAT, content=body, headers=headers)
    assert long_id.headers["x-request-id"] == "r" * 64

    refused = await client.post(
        HEARTBEAT,
        content=body,
        headers={**plugin.headers(body, HEARTBEAT), "X-Signature": "v1=" + "0" * 64},
    )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "bad_signature"
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])

    after = (await client.get("/metrics")).text
    assert _count(after, "200") - _count(before, "200") == 3
    assert _count(after, "401") - _count(before, "401") == 1


async def test_a_chunked_heartbeat_is_served_through_the_whole_stack(
    client: Any, plugin: Plugin
) -> None:
    body = heartbeat_body(uptime_s=11)
    headers = plugin.headers(body, HEARTBEAT)

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:]

    answer = await client.post(HEARTBEAT, content=chunks(), headers=headers)
    assert answer.status_code == 200, answer.text
    assert "x-signature" in answer.headers
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    # The same signed message again is a replay, whichever path it takes.
    replay = await client.post(HEARTBEAT, content=body, headers=headers)
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "replay"


def _ingest_backends(db: Any) -> list[tuple[str | None, str | None]]:
    """(wait_event_type, state) of the API's ingest connections to the test's database."""
    return db.execute(
        "SELECT wait_event_type, state FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'selfheal-api-ingest'"
    ).fetchall()


@pytest.mark.parametrize("connections", [1, 2])
async def test_a_blocked_batch_holds_up_others_only_when_it_has_the_only_ingest_connection(
    settings: Any, db: Any, database_url: str, connections: int
) -> None:
    """SELFHEAL_INGEST_CONNECTIONS bounds the batches an API process has in the database at
    once: with one, a heartbeat waits for the batch in flight; with two, it goes past it."""
    settings = settings.model_copy(update={"ingest_connections": connections})
    stuck = await register(settings, tenant="merchant-1")
    other = await register(settings, tenant="merchant-2")
    with psycopg.connect(database_url) as locker:
        # The stuck plugin's batch waits on its installation row (its update) until we commit.
        locker.execute("SELECT 1 FROM merchant_plugins WHERE id = %s FOR UPDATE", (stuck.id,))
        async with serve(settings) as (app, client):
            batcher = app.state.services.batcher
            submitted: list[Any] = []
            submit = batcher.submit

            async def counted(*args: Any) -> Any:
                submitted.append(args)
                return await submit(*args)

            batcher.submit = counted
            first = asyncio.create_task(send_heartbeat(client, stuck))
            await until(
                lambda: any(wait == "Lock" for wait, _ in _ingest_backends(db)),
                10,
                "the first batch to wait on the row lock",
            )
            second = asyncio.create_task(send_heartbeat(client, other))
            if connections == 1:
                await until(lambda: len(submitted) == 2, 10, "the second heartbeat handed over")
                await asyncio.sleep(0)
                # Handed to the batcher, it cannot be answered while the only connection waits.
                assert not second.done()
                assert len(_ingest_backends(db)) == 1
                locker.commit()
            else:
                answered = await asyncio.wait_for(second, 10)
                assert answered.status_code == 200, answered.text
                assert not first.done()  # it went past the blocked batch
                locker.commit()
            answers = [await first, await second]
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            assert len(_ingest_backends(db)) == connections
    assert db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()[0] == 2
