"""A heartbeat whose answer never came back, with the real API (its lifespan, PostgreSQL and
Redis) and the real plugin_client: the agent sends the same signed bytes again, the control
plane answers the copy of a stored heartbeat with a signed 401 replay naming it, and the
counts are stored once (plugin_client.md, "Counting"). The network faults are made by an
httpx transport in front of the API: the request reaches it, the answer does not reach the
agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from app.core.settings import Settings
from plugin_client import AsyncAgent, HeartbeatFailed
from tests.support.api import serve
from tests.support.plugins import HEARTBEAT, Plugin

Fault = Callable[[httpx.Request, httpx.AsyncBaseTransport], Any]


class Faulty(httpx.AsyncBaseTransport):
    """Passes requests to the API; the next heartbeats go through `faults` first, one each."""

    def __init__(self, app: Any) -> None:
        self.api = httpx.ASGITransport(app=app)
        self.faults: list[Fault] = []
        self.heartbeats = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == HEARTBEAT:
            self.heartbeats += 1
            if self.faults:
                return await self.faults.pop(0)(request, self.api)
        return await self.api.handle_async_request(request)


async def answer_lost(request: httpx.Request, api: httpx.AsyncBaseTransport) -> httpx.Response:
    """The API stores the heartbeat and answers; the answer is lost on the way back."""
    response = await api.handle_async_request(request)
    await response.aread()
    raise httpx.ReadError("connection reset by peer", request=request)


async def sent_twice(request: httpx.Request, api: httpx.AsyncBaseTransport) -> httpx.Response:
    """A proxy that sends the request on twice (its first upstream try looked failed) and
    hands back the second answer."""
    await (await api.handle_async_request(request)).aread()
    return await api.handle_async_request(request)


async def no_answer_yet(request: httpx.Request, api: httpx.AsyncBaseTransport) -> httpx.Response:
    """Stored; the answer takes longer than the caller is willing to wait."""
    await (await api.handle_async_request(request)).aread()
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


@pytest.fixture
async def setup(settings: Settings, plugin: Plugin) -> AsyncIterator[tuple[AsyncAgent, Faulty]]:
    async with serve(settings) as (app, _):
        transport = Faulty(app)
        async with httpx.AsyncClient(transport=transport) as http:
            agent = AsyncAgent(
                "http://selfheal.test",
                plugin.id,
                plugin.secret,
                plugin=plugin.name,
                version="1.2.2",
                http=http,
                early_report=False,
            )
            try:
                yield agent, transport
            finally:
                await agent.aclose()


def requests_stored(db: Any, plugin: Plugin) -> list[int]:
    rows = db.execute(
        "SELECT requests FROM plugin_heartbeats WHERE installation_id = %s ORDER BY id",
        (plugin.id,),
    ).fetchall()
    return [n for (n,) in rows]


async def test_a_lost_answer_is_followed_by_the_same_bytes_and_the_counts_are_stored_once(
    setup: tuple[AsyncAgent, Faulty], plugin: Plugin, db: Any
) -> None:
    agent, transport = setup
    agent.record_request(7)
    transport.faults.append(answer_lost)
    with pytest.raises(HeartbeatFailed, match="unreachable"):
        await agent.beat()
    agent.record_request(2)
    assert await agent.beat() == {}  # the signed 401 replay: the first copy was stored
    await agent.beat()
    assert requests_stored(db, plugin) == [7, 2]
    assert agent.stats.heartbeats_resent == 1
    assert agent.stats.heartbeats_sent == 2


async def test_a_replay_answer_to_a_first_send_that_a_proxy_sent_twice_is_accepted(
    setup: tuple[AsyncAgent, Faulty], plugin: Plugin, db: Any
) -> None:
    agent, transport = setup
    agent.record_request(5)
    transport.faults.append(sent_twice)
    assert await agent.beat() == {}
    await agent.beat()
    assert requests_stored(db, plugin) == [5, 0]
    assert agent.stats.heartbeats_resent == 0


async def test_a_heartbeat_cancelled_while_in_flight_is_sent_again_as_it_was(
    setup: tuple[AsyncAgent, Faulty], plugin: Plugin, db: Any
) -> None:
    agent, transport = setup
    agent.record_request(4)
    transport.faults.append(no_answer_yet)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(agent.beat(), 1.0)
    assert await agent.beat() == {}
    assert requests_stored(db, plugin) == [4]
    assert transport.heartbeats == 2
