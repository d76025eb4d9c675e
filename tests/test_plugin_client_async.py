"""AsyncAgent on the main paths (beat with commands, start/stop, a shared client that is not
closed, backoff, refusals) and the ASGI middleware with both agents."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from plugin_client import Agent, AsyncAgent, EarlyReport, HeartbeatFailed, SelfhealMiddleware
from tests.support.artifacts import PLUGIN, ReleaseSigner
from tests.support.fakes import FakeControlPlane, agent_options, command, running

pytestmark = pytest.mark.no_services

DATA = b"async release bytes"


class Ceiling(random.Random):
    def random(self) -> float:
        return 1.0


@pytest.fixture
def cp() -> Iterator[FakeControlPlane]:
    with running(FakeControlPlane()) as plane:
        yield plane


@pytest.fixture
def signer() -> ReleaseSigner:
    return ReleaseSigner()


@pytest.fixture
async def make_agent(
    cp: FakeControlPlane, signer: ReleaseSigner, tmp_path: Path
) -> AsyncIterator[Callable[..., AsyncAgent]]:
    agents: list[AsyncAgent] = []

    def make(**overrides: Any) -> AsyncAgent:
        options = agent_options(cp, signer, tmp_path, **overrides)
        agent = AsyncAgent(**options)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.aclose()


def update_command(
    cp: FakeControlPlane, signer: ReleaseSigner, version: str = "1.2.3"
) -> dict[str, Any]:
    cp.artifacts[(PLUGIN, version)] = DATA
    url = f"{cp.url}/api/plugins/releases/{PLUGIN}/{version}/artifact"
    return command("update", signer.payload(DATA, version=version, artifact_url=url))


async def wait_for(cp: FakeControlPlane, predicate: Callable[[], bool]) -> bool:
    return await asyncio.to_thread(cp.wait_for, predicate)


# --------------------------------------------------------------------------- AsyncAgent


async def test_beat_runs_async_and_sync_handlers(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., AsyncAgent]
) -> None:
    agent = make_agent()
    installed: list[tuple[str, bytes]] = []
    configured: list[dict[str, Any]] = []

    @agent.on_update
    async def install(version: str, artifact: Path) -> None:
        await asyncio.sleep(0)
        installed.append((version, artifact.read_bytes()))

    @agent.on_config
    def configure(values: dict[str, Any]) -> None:  # a plain function: run in a thread
        configured.append(values)

    update = update_command(cp, signer)
    config = command("config", {"values": {"retries": 3}})
    cp.queue(update, config)
    body = await agent.beat()
    assert [c["id"] for c in body["commands"]] == [update["id"], config["id"]]
    assert installed == [("1.2.3", DATA)]
    assert configured == [{"retries": 3}]
    assert cp.reports_for(update["id"], "ack")[0].body["result"]["version"] == "1.2.3"
    assert cp.reports_for(config["id"], "ack")
    assert agent.version == "1.2.3"
    cp.queue(update)  # delivered again: not run again, acked again
    await agent.beat()
    assert installed == [("1.2.3", DATA)]
    assert len(cp.reports_for(update["id"], "ack")) == 2


async def test_start_stop_with_a_shared_client(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., AsyncAgent]
) -> None:
    async with httpx.AsyncClient() as client:
        agent = make_agent(http=client)
        rolled: list[str] = []
        agent.on_update(lambda version, artifact: None)
        agent.on_rollback(rolled.append)
        cp.queue(update_command(cp, signer))
        await agent.start()
        # next_heartbeat_s is an hour: 1.2.3 arrives only with the follow-up after the update.
        assert await wait_for(
            cp, lambda: bool(cp.exchanges) and cp.exchanges[-1].body["plugin_version"] == "1.2.3"
        )
        cp.queue(command("rollback", {"version": "1.2.2"}))
        await agent.beat()
        assert rolled == ["1.2.2"]
        await agent.stop()
        count = len(cp.exchanges)
        await agent.aclose()
        assert not client.is_closed  # not the agent's to close
        assert (await client.get(f"{cp.url}/mirror/none")).status_code == 404
        assert len(cp.exchanges) == count
        # The rollback came with a manual beat(), which sends no follow-up itself.
        assert [e.body["plugin_version"] for e in cp.exchanges] == ["1.2.2", "1.2.3", "1.2.3"]
        assert agent.version == "1.2.2"


async def test_async_with_starts_and_stops_and_closes_its_own_client(
    cp: FakeControlPlane, make_agent: Callable[..., AsyncAgent]
) -> None:
    agent = make_agent()
    async with agent:
        assert await wait_for(cp, lambda: len(cp.exchanges) == 1)
    assert agent._http.is_closed
    assert agent.stats.heartbeats_sent == 1


async def test_many_agents_share_one_client(cp: FakeControlPlane, tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        agents = [
            AsyncAgent(cp.url, cp.plugin_id, cp.secret, plugin=PLUGIN, version="1.2.2", http=client)
            for _ in range(50)
        ]
        for agent in agents:
            agent.record_request(2)
            await agent.start()
        assert await wait_for(cp, lambda: len(cp.exchanges) == 50)
        await asyncio.gather(*(agent.aclose() for agent in agents))
        assert not client.is_closed
    assert sum(e.body["telemetry"]["requests"] for e in cp.exchanges) == 100


async def test_async_backoff_while_the_server_is_down(tmp_path: Path) -> None:
    down = FakeControlPlane()
    delays: list[float] = []
    done = asyncio.Event()

    async def wait(delay: float) -> bool:
        delays.append(delay)
        if len(delays) >= 8:
            done.set()
            return True
        return False

    agent = AsyncAgent(
        down.url,
        down.plugin_id,
        down.secret,
        plugin=PLUGIN,
        version="1.2.2",
        rng=Ceiling(),
        wait=wait,
        interval_s=20,
    )
    agent.record_request(7)
    await agent.start()
    await asyncio.wait_for(done.wait(), 60)
    await agent.aclose()
    assert delays == [1, 2, 4, 8, 16, 20, 20, 20]
    assert agent.pending_telemetry()["requests"] == 7


async def test_async_heartbeat_whose_answer_was_lost_is_sent_again_as_is(
    cp: FakeControlPlane, make_agent: Callable[..., AsyncAgent]
) -> None:
    """Stored, answer cut off: the same signed bytes again, confirmed by the signed 401
    replay; the counts are stored once."""
    agent = make_agent()
    agent.record_request(6)
    cp.mode = "lost"
    with pytest.raises(HeartbeatFailed, match="unreachable"):
        await agent.beat()
    cp.mode = "ok"
    assert await agent.beat() == {}
    agent.record_request(1)
    await agent.beat()
    assert [hb["telemetry"]["requests"] for hb in cp.stored()] == [6, 1]
    assert (cp.replays, agent.stats.heartbeats_resent) == (1, 1)


async def test_async_refuses_commands_of_an_unsigned_response(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., AsyncAgent]
) -> None:
    agent = make_agent()
    called: list[str] = []
    agent.on_update(lambda version, artifact: called.append(version))
    cp.signing = "unsigned"
    update = update_command(cp, signer)
    cp.queue(update)
    agent.record_request(4)
    with pytest.raises(HeartbeatFailed, match="unsigned response"):
        await agent.beat()
    assert called == []
    assert "unsigned response" in cp.fail_reason(update["id"])
    # It was stored all the same: the same bytes again get the signed 401 replay, and the
    # counts are not sent a second time.
    cp.signing = "signed"
    assert await agent.beat() == {}
    assert [hb["telemetry"]["requests"] for hb in cp.stored()] == [4]
    assert cp.replays == 1


async def test_async_refuses_an_update_to_a_lower_version(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., AsyncAgent]
) -> None:
    agent = make_agent()
    called: list[str] = []
    agent.on_update(lambda version, artifact: called.append(version))
    cmd = update_command(cp, signer, "1.1.9")
    cp.queue(cmd)
    await agent.beat()
    assert called == []
    assert "not newer" in cp.fail_reason(cmd["id"])


async def test_async_stop_is_prompt(
    cp: FakeControlPlane, make_agent: Callable[..., AsyncAgent]
) -> None:
    agent = make_agent()
    await agent.start()
    assert await wait_for(cp, lambda: len(cp.exchanges) == 1)
    await asyncio.wait_for(agent.stop(), 30)  # waiting an hour for the next beat: cut short
    assert agent._task is not None and agent._task.done()


# --------------------------------------------------------------------------- middleware


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def server_error(request: Request) -> Response:
    return PlainTextResponse("broken", status_code=503)


async def boom(request: Request) -> Response:
    raise RuntimeError("unhandled")


async def not_found(request: Request) -> Response:
    return PlainTextResponse("nope", status_code=404)


def tiny_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/ok", ok),
            Route("/error", server_error),
            Route("/boom", boom),
            Route("/missing", not_found),
        ]
    )


@pytest.mark.parametrize("kind", [Agent, AsyncAgent])
async def test_middleware_counts_requests_5xx_and_exceptions(
    kind: type[Agent] | type[AsyncAgent],
) -> None:
    agent = kind("http://127.0.0.1:9", "id", "secret", plugin=PLUGIN, version="1.0.0")
    app = tiny_app()
    app.add_middleware(SelfhealMiddleware, agent=agent)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/ok")).status_code == 200
        assert (await client.get("/ok")).status_code == 200
        assert (await client.get("/missing")).status_code == 404
        assert (await client.get("/error")).status_code == 503
        assert (await client.get("/boom")).status_code == 500
    telemetry = agent.pending_telemetry()
    assert (telemetry["requests"], telemetry["errors"]) == (5, 2)
    assert telemetry["latency_p95_ms"] >= 0
    if isinstance(agent, AsyncAgent):
        await agent.aclose()
    else:
        agent.close()


async def test_middleware_reraises_and_wraps_any_asgi_app() -> None:
    agent = AsyncAgent("http://127.0.0.1:9", "id", "secret", plugin=PLUGIN, version="1.0.0")
    app = agent.asgi_middleware(tiny_app())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        with pytest.raises(RuntimeError, match="unhandled"):
            await client.get("/boom")
    telemetry = agent.pending_telemetry()
    assert (telemetry["requests"], telemetry["errors"]) == (1, 1)
    await agent.aclose()


async def test_trouble_counted_from_another_thread_wakes_the_async_loop(
    cp: FakeControlPlane, make_agent: Callable[..., AsyncAgent]
) -> None:
    agent = make_agent(early_report=EarlyReport(min_spacing_s=0.2))
    await agent.start()
    assert await wait_for(cp, lambda: len(cp.exchanges) == 1)
    # A host counting in a worker thread, as a sync web framework would.
    await asyncio.to_thread(agent.record_webhook, ok=False, count=20)
    assert await wait_for(cp, lambda: len(cp.exchanges) == 2)
    assert cp.exchanges[1].body["telemetry"]["webhook_failures"] == 20
    await agent.stop()
    assert len(cp.exchanges) == 2
