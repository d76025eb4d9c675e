"""GET /health (ok | degraded | down, per component), GET /metrics (Prometheus text), the
request id header, and the JSON error shape of routing errors."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support.api import serve
from tests.support.plugins import send_heartbeat
from tests.support.processes import running_worker
from tests.support.settings import make_settings

CLOSED_POSTGRES = "postgresql://postgres@127.0.0.1:1/selfheal"
CLOSED_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that completes the handshake (kernel backlog) but never says anything: a hung
    server, the case where only a timeout can bound the answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample, matched by name and (a subset of) its labels."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(
            re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or "")
        )
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return None


# --- /health ----------------------------------------------------------------------------------


async def test_health_is_ok_when_postgres_redis_and_a_worker_answer(client, settings):
    async with running_worker(settings):
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"status", "components"}
    assert body["status"] == "ok"
    assert set(body["components"]) == {
        "postgres",
        "redis",
        "credential_changes",
        "workers",
        "decision_service",
    }
    assert body["components"]["decision_service"]["status"] == "ok"
    assert body["components"]["credential_changes"] == {"status": "ok"}
    assert body["components"]["workers"]["status"] == "ok"
    postgres, redis = body["components"]["postgres"], body["components"]["redis"]
    assert postgres["status"] == "ok"
    assert postgres["plugins_overdue"] == 0
    assert postgres["latency_ms"] >= 0
    assert redis["status"] == "ok"
    assert redis["latency_ms"] >= 0


async def test_an_open_decision_breaker_on_a_live_worker_degrades_health(client, settings):
    """Workers publish their circuit breaker; an open one means decisions come from the
    fallback there. A stale entry (a worker gone for long) is ignored."""
    import time

    import orjson
    from redis import Redis as SyncRedis

    from app.core.redis import decision_breaker_key

    redis = SyncRedis.from_url(settings.redis_url)
    try:
        key = decision_breaker_key(settings)
        redis.hset(key, "old-host:1", orjson.dumps({"state": "open", "at": time.time() - 3600}))
        redis.hset(key, "host:2", orjson.dumps({"state": "closed", "at": time.time()}))
        body = (await client.get("/health")).json()
        assert body["components"]["decision_service"]["breaker"] == "closed"
        assert body["components"]["decision_service"]["workers"] == {"host:2": "closed"}
        redis.hset(key, "host:3", orjson.dumps({"state": "open", "at": time.time()}))
        body = (await client.get("/health")).json()
    finally:
        redis.close()
    assert body["status"] == "degraded"
    assert body["components"]["decision_service"]["status"] == "degraded"
    assert body["components"]["decision_service"]["breaker"] == "open"
    metrics = (await client.get("/metrics")).text
    assert 'selfheal_decision_breaker_workers{state="open"} 1.0' in metrics


async def test_health_counts_overdue_plugins(client, db, plugin):
    db.execute(
        "UPDATE merchant_plugins SET next_expected_at = now() - interval '1 hour' WHERE id = %s",
        (plugin.id,),
    )
    body = (await client.get("/health")).json()
    assert body["components"]["postgres"]["plugins_overdue"] == 1


async def test_health_is_degraded_200_when_redis_is_down(database_url, redis_prefix):
    settings = make_settings(database_url, CLOSED_REDIS, redis_prefix)
    async with serve(settings) as (_, client):
        started = time.monotonic()
        response = await client.get("/health")
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["components"]["postgres"]["status"] == "ok"
    assert body["components"]["redis"]["status"] == "down"
    assert body["components"]["redis"]["error"]
    assert elapsed < 6


async def test_health_is_down_503_quickly_when_postgres_refuses_connections(servers, redis_prefix):
    settings = make_settings(CLOSED_POSTGRES, servers.redis_url, redis_prefix)
    async with serve(settings) as (_, client):
        started = time.monotonic()
        response = await client.get("/health")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down"
    assert body["components"]["postgres"]["status"] == "down"
    assert body["components"]["postgres"]["error"]
    assert body["components"]["redis"]["status"] == "ok"
    assert elapsed < 6


async def test_health_is_down_503_within_bounded_time_when_postgres_hangs(
    servers, redis_prefix, silent_port
):
    settings = make_settings(
        f"postgresql://postgres@127.0.0.1:{silent_port}/selfheal", servers.redis_url, redis_prefix
    )
    async with serve(settings) as (_, client):
        started = time.monotonic()
        response = await client.get("/health")
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down"
    assert body["components"]["postgres"]["status"] == "down"
    assert elapsed < 6


async def test_health_is_degraded_within_bounded_time_when_redis_hangs(
    database_url, redis_prefix, silent_port
):
    settings = make_settings(database_url, f"redis://127.0.0.1:{silent_port}/0", redis_prefix)
    async with serve(settings) as (_, client):
        started = time.monotonic()
        response = await client.get("/health")
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["components"]["redis"]["status"] == "down"
    assert elapsed < 6


# --- /metrics ---------------------------------------------------------------------------------


async def test_metrics_is_prometheus_text_with_selfheal_series(database_url, servers, redis_prefix):
    settings = make_settings(database_url, servers.redis_url, redis_prefix, db_pool_size=7)
    async with serve(settings) as (_, client):
        assert (await client.get("/health")).status_code == 200
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE selfheal_heartbeats_accepted_total counter" in text
    assert "# TYPE selfheal_http_request_duration_seconds histogram" in text
    assert "# TYPE selfheal_db_pool_connections gauge" in text
    assert sample(text, "selfheal_heartbeats_accepted_total") is not None
    # The /health request just made is in the latency histogram under its route template.
    assert (
        sample(
            text,
            "selfheal_http_request_duration_seconds_bucket",
            method="GET",
            route="/health",
            status="200",
            le="+Inf",
        )
        or 0
    ) >= 1
    # Pool gauges describe this app's pool.
    assert sample(text, "selfheal_db_pool_connections", state="size") == 7.0
    for state in ("checked_out", "idle", "overflow"):
        assert sample(text, "selfheal_db_pool_connections", state=state) is not None


async def test_accepted_heartbeat_increments_the_counter_by_one(client, plugin):
    before = sample((await client.get("/metrics")).text, "selfheal_heartbeats_accepted_total")
    assert before is not None
    response = await send_heartbeat(client, plugin)
    assert response.status_code == 200, response.text
    after = sample((await client.get("/metrics")).text, "selfheal_heartbeats_accepted_total")
    assert after == before + 1


async def test_unmatched_routes_share_one_latency_label(client):
    await client.get("/no/such/route/12345")
    text = (await client.get("/metrics")).text
    assert "/no/such/route/12345" not in text
    assert (
        sample(
            text,
            "selfheal_http_request_duration_seconds_count",
            route="unmatched",
            status="404",
        )
        or 0
    ) >= 1


# --- request id -------------------------------------------------------------------------------


async def test_every_response_carries_a_distinct_generated_request_id(client):
    seen = set()
    for path in ("/health", "/health", "/metrics", "/api/ops/policy", "/nowhere"):
        request_id = (await client.get(path)).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), (path, request_id)
        seen.add(request_id)
    assert len(seen) == 5


async def test_a_sent_request_id_is_echoed(client):
    response = await client.get("/health", headers={"X-Request-ID": "trace-abc-123"})
    assert response.headers["x-request-id"] == "trace-abc-123"
    response = await client.get("/api/ops/policy", headers={"X-Request-ID": "trace-401"})
    assert response.status_code == 401
    assert response.headers["x-request-id"] == "trace-401"


async def test_a_long_request_id_is_cut_to_64_characters(client):
    response = await client.get("/health", headers={"X-Request-ID": "r" * 500})
    assert response.headers["x-request-id"] == "r" * 64


# --- routing errors ---------------------------------------------------------------------------


async def test_unknown_route_is_404_json_error(client):
    response = await client.get("/api/does-not-exist")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"code": "not_found", "message": "Not Found"}}


async def test_wrong_method_is_405_json_error_with_allow(client):
    response = await client.post("/health")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/json"
    assert response.headers["allow"] == "GET"
    assert response.json() == {
        "error": {"code": "method_not_allowed", "message": "Method Not Allowed"}
    }
    response = await client.delete("/api/ops/policy")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_health_is_degraded_without_a_worker(client):
    body = (await client.get("/health")).json()
    assert body["status"] == "degraded"
    assert body["components"]["workers"]["status"] == "down"
    assert body["components"]["postgres"]["status"] == "ok"
