"""Rate limits (app/core/ratelimit.py) as plugins and ops meet them: a real API on a loopback
port, real PostgreSQL and Redis. Per installation and per tenant on the plugin API, per token
on the ops API; 429 with Retry-After; one Redis round trip per heartbeat; and a Redis that is
down lets requests through (heartbeats never needed it)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.core.ratelimit import RateLimited, RateLimiter
from app.core.settings import Settings
from tests.support.api import serve, serve_http
from tests.support.personas import make_user
from tests.support.plugins import Plugin, register, send_heartbeat
from tests.support.ports import free_port


@contextlib.asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API listening on a free loopback port, at the given settings."""
    async with serve_http(settings.model_copy(update={"port": free_port()})) as (_, client):
        yield client


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_defaults_a_flooding_installation_gets_429_and_slows_no_other_tenant(
    settings: Settings,
) -> None:
    """At the default settings: one installation sends ~100 heartbeats/s (a plugin at 20/s is
    flooding), while ten installations of another tenant, and one of the flooder's own
    tenant, keep their normal pace. The flooder gets 429 with Retry-After; every heartbeat of
    the others is stored, and their p99 stays within a generous bound of the p99 measured
    without the flood, in this same test."""
    flooder = await register(settings, tenant="noisy", name="payments")
    neighbour = await register(settings, tenant="noisy", name="shipping")
    others = [await register(settings, tenant="quiet", name=f"p{i}") for i in range(10)]

    async with api(settings) as client:

        async def round_of_others() -> list[tuple[int, float]]:
            results = []
            for plugin in [*others, neighbour]:
                started = time.perf_counter()
                response = await send_heartbeat(client, plugin)
                results.append((response.status_code, time.perf_counter() - started))
            return results

        baseline: list[tuple[int, float]] = []
        for _ in range(3):
            baseline += await round_of_others()
        assert {status for status, _ in baseline} == {200}

        flood: list[httpx.Response] = []
        stop = asyncio.Event()

        async def flood_from(plugin: Plugin) -> None:
            while not stop.is_set():
                flood.append(await send_heartbeat(client, plugin))
                await asyncio.sleep(0.02)  # load generation: ~50/s per sender

        flood_started = time.monotonic()
        senders = [asyncio.create_task(flood_from(flooder)) for _ in range(2)]
        try:
            # Let the flooder use up its burst first: the rest of the flood is refused.
            while sum(r.status_code == 429 for r in flood) < 5:
                await asyncio.sleep(0.01)
            during: list[tuple[int, float]] = []
            for _ in range(3):
                during += await round_of_others()
        finally:
            stop.set()
            await asyncio.gather(*senders)
            flood_s = time.monotonic() - flood_started

    assert [status for status, _ in during] == [200] * len(during)
    refused = [r for r in flood if r.status_code == 429]
    accepted = [r for r in flood if r.status_code == 200]
    # Its burst (20), then one per interval (10 s / 20): the rest is refused.
    allowed = settings.rate_per_installation * (1 + flood_s / settings.rate_window_s)
    assert len(refused) >= 5 and len(accepted) <= allowed + 1, (len(accepted), flood_s)
    assert {r.json()["error"]["code"] for r in refused} == {"rate_limited"}
    assert all(1 <= int(r.headers["retry-after"]) <= 10 for r in refused)
    assert "installation" in refused[0].json()["error"]["message"]
    base_p99 = p99([latency for _, latency in baseline])
    flood_p99 = p99([latency for _, latency in during])
    assert flood_p99 <= 4 * base_p99 + 0.15, (base_p99, flood_p99)


async def test_the_tenant_limit_counts_every_installation_of_the_tenant(
    settings: Settings, db: Any
) -> None:
    tight = settings.model_copy(update={"rate_per_installation": 100, "rate_per_tenant": 4})
    first = await register(settings, tenant="big", name="a")
    second = await register(settings, tenant="big", name="b")
    elsewhere = await register(settings, tenant="small", name="a")
    async with api(tight) as client:
        statuses = [(await send_heartbeat(client, p)).status_code for p in [first, second] * 2]
        assert statuses == [200] * 4
        refused = await send_heartbeat(client, second)
        assert refused.status_code == 429
        assert "tenant" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # A refused request counts for nothing, and another tenant is not concerned.
        for _ in range(4):
            assert (await send_heartbeat(client, elsewhere)).status_code == 200
    stored = db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()
    assert stored == (8,)


async def test_a_heartbeat_costs_one_redis_round_trip(settings: Settings, plugin: Plugin) -> None:
    async with serve(settings) as (app, client):
        # One first, so that Redis knows the limiter's script (a new Redis answers NOSCRIPT
        # once, and redis-py loads it and tries again).
        assert (await send_heartbeat(client, plugin)).status_code == 200
        redis = app.state.services.redis
        commands: list[str] = []
        original = redis.execute_command

        async def counting(*args: Any, **options: Any) -> Any:
            commands.append(str(args[0]))
            return await original(*args, **options)

        redis.execute_command = counting
        try:
            for _ in range(5):
                assert (await send_heartbeat(client, plugin)).status_code == 200
        finally:
            del redis.execute_command
    assert commands == ["EVALSHA"] * 5


async def test_ops_tokens_are_limited_each_before_the_token_is_looked_up(
    settings: Settings,
) -> None:
    viewer = await make_user(settings, "vera", "viewer")
    other = await make_user(settings, "otto", "viewer")
    tight = settings.model_copy(update={"rate_per_ops_token": 3})
    async with api(tight) as client:
        statuses = [
            (await client.get("/api/ops/policy", headers=viewer.auth)).status_code for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        refused = await client.get("/api/ops/policy", headers=viewer.auth)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limited"
        assert (await client.get("/api/ops/policy", headers=other.auth)).status_code == 200
        # A made-up token of the right shape meets the limit too: past it, no lookup is made
        # (429, not 401). One of the wrong shape is refused on its shape, before any of this.
        made_up = {"Authorization": "Bearer sht_" + "b" * 43}
        statuses = [
            (await client.get("/api/ops/policy", headers=made_up)).status_code for _ in range(4)
        ]
        assert statuses == [401, 401, 401, 429]


async def test_redis_down_lets_heartbeats_and_ops_through_and_says_so(
    settings: Settings, plugin: Plugin, capfd: pytest.CaptureFixture[str]
) -> None:
    viewer = await make_user(settings, "vera", "viewer")
    away = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "log_level": "info"}
    )
    async with api(away) as client:
        for _ in range(3):
            assert (await send_heartbeat(client, plugin)).status_code == 200
        assert (await client.get("/api/ops/policy", headers=viewer.auth)).status_code == 200
        metrics = (await client.get("/metrics")).text
    [unchecked] = [
        line
        for line in metrics.splitlines()
        if line.startswith("selfheal_rate_limiter_unavailable_total ")
    ]
    assert float(unchecked.split()[1]) >= 4, unchecked
    logged = capfd.readouterr().err
    assert logged.count('"event": "rate_limiter_unavailable"') == 1, logged[-2000:]


async def test_concurrent_checks_share_one_call_and_still_count_each_request(
    settings: Settings,
) -> None:
    """The checks of one event-loop turn go to Redis together: 25 concurrent requests of one
    installation under a limit of 20 make one script call, and exactly 20 pass."""
    redis = Redis.from_url(settings.redis_url or "")
    limiter = RateLimiter(redis, settings.redis_prefix)
    # Once first, so that Redis knows the script (a new Redis answers the first EVALSHA with
    # NOSCRIPT, and redis-py loads it and tries again).
    await limiter.check(limiter.limit("installation", "warm-up", 20, 10.0))
    calls: list[str] = []
    original = redis.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return await original(*args, **kwargs)

    redis.execute_command = counting  # type: ignore[method-assign]
    try:

        async def one() -> bool:
            try:
                await limiter.check(
                    limiter.limit("installation", "one", 20, 10.0),
                    limiter.limit("tenant", "t", 5000, 10.0),
                )
            except RateLimited as exc:
                assert exc.limit == "installation" and exc.retry_after_s >= 1
                return False
            return True

        outcomes = await asyncio.gather(*(one() for _ in range(25)))
    finally:
        del redis.execute_command
        await redis.aclose()
    assert outcomes.count(True) == 20
    assert calls == ["EVALSHA"]
