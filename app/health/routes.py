"""GET /health (ok | degraded | down, per component) and GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import orjson
import structlog
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.responses import PlainTextResponse, Response

from app.core.metrics import (
    ATTEMPTS_IN_FLIGHT,
    DB_POOL,
    DECISION_BREAKER,
    OPEN_INCIDENTS,
    OUTBOX_WAITING,
    render_metrics,
)
from app.core.redis import decision_breaker_key, health_check_key
from app.health import repository
from app.services import Services, services

router = APIRouter(tags=["operations"])
log = structlog.get_logger("selfheal.health")

_CHECK_TIMEOUT_S = 2.0

# --- The /health answer, for the OpenAPI document ---------------------------------------------
# The route builds the body as a dict (below); these models describe it. A key a check did not
# report is absent, never null (hence SkipJsonSchema[None]).

HealthStatus = Literal["ok", "degraded", "down"]


class ComponentCheck(BaseModel):
    """One component's check: ok with its latency, or down with the error's type."""

    status: HealthStatus
    latency_ms: float | SkipJsonSchema[None] = None
    error: str | SkipJsonSchema[None] = Field(
        None, description="Why it is down (the details go to the server log)"
    )


class PostgresCheck(ComponentCheck):
    plugins_overdue: int | SkipJsonSchema[None] = Field(
        None, description="Active installations whose heartbeat is overdue"
    )


class WorkersCheck(ComponentCheck):
    last_report: str | SkipJsonSchema[None] = Field(
        None, description="What the last live worker reported"
    )


class DecisionServiceCheck(ComponentCheck):
    breaker: Literal["closed", "half_open", "open", "unknown"] | SkipJsonSchema[None] = Field(
        None, description="The worst circuit breaker state among the live workers"
    )
    workers: dict[str, str] | SkipJsonSchema[None] = Field(
        None, description="Each live worker's breaker state"
    )
    note: str | SkipJsonSchema[None] = None


class CredentialChangesCheck(BaseModel):
    status: Literal["ok", "down"]


class HealthComponents(BaseModel):
    postgres: PostgresCheck
    redis: ComponentCheck
    credential_changes: CredentialChangesCheck
    workers: WorkersCheck
    decision_service: DecisionServiceCheck


class Health(BaseModel):
    status: HealthStatus = Field(
        description="ok; degraded (200) when a component other than PostgreSQL is not ok;"
        " down (503) without PostgreSQL"
    )
    components: HealthComponents


async def _timed(check: Any) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check, _CHECK_TIMEOUT_S)
    except TimeoutError:
        return {"status": "down", "error": f"no answer within {_CHECK_TIMEOUT_S:g} s"}
    except Exception as exc:
        # /health is unauthenticated: the details (host names, roles) go to the log only.
        log.warning("health_check_failed", error=f"{type(exc).__name__}: {exc}"[:300])
        return {"status": "down", "error": type(exc).__name__}
    return {
        "status": "ok",
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        **detail,
    }


async def _check_postgres(svc: Services) -> dict[str, Any]:
    async with svc.engine.connect() as conn:
        overdue = await repository.overdue_installations(
            conn, grace_s=svc.settings.heartbeat_grace_s
        )
    return {"plugins_overdue": overdue}


async def _check_redis(svc: Services) -> dict[str, Any]:
    await svc.redis.ping()
    return {}


async def _check_workers(svc: Services) -> dict[str, Any]:
    # arq rewrites this key every few seconds and lets it expire: present = a worker is alive.
    beat = await svc.redis.get(health_check_key(svc.settings))
    if beat is None:
        return {"status": "down", "error": "no worker has reported in the last seconds"}
    text = beat.decode(errors="replace") if isinstance(beat, bytes) else str(beat)
    return {"last_report": text[:200]}


_BREAKER_STALE_S = 30.0
_BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


async def _check_decision_service(svc: Services) -> dict[str, Any]:
    """The workers' circuit breakers for the decision service, as each last published it.
    Open on any live worker means decisions come from the fallback there: degraded."""
    entries: dict[Any, Any] = await svc.redis.hgetall(  # type: ignore[misc]
        decision_breaker_key(svc.settings)
    )
    now = time.time()
    workers: dict[str, Any] = {}
    for name, raw in entries.items():
        try:
            snapshot = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if now - float(snapshot.get("at", 0)) > _BREAKER_STALE_S:
            continue
        key = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        workers[key] = snapshot.get("state", "unknown")
    worst = max(workers.values(), key=lambda s: _BREAKER_LEVEL.get(s, 0), default="unknown")
    for state in _BREAKER_LEVEL:
        DECISION_BREAKER.labels(state).set(sum(1 for s in workers.values() if s == state))
    detail: dict[str, Any] = {"breaker": worst, "workers": workers}
    if not svc.settings.sira_api_url:
        detail["note"] = "SIRA_API_URL is unset: decisions come from the fallback heuristics"
    if worst == "open":
        return {"status": "degraded", **detail}
    return detail


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "Down: PostgreSQL does not answer"}},
)
async def health(request: Request) -> Response:
    svc = services(request)
    postgres, redis, workers, decision = await asyncio.gather(
        _timed(_check_postgres(svc)),
        _timed(_check_redis(svc)),
        _timed(_check_workers(svc)),
        _timed(_check_decision_service(svc)),
    )
    # PostgreSQL is the source of truth: without it nothing works. Without Redis heartbeats are
    # still stored, but acks and jobs are not: the service is degraded, not down.
    if postgres["status"] != "ok":
        status, code = "down", 503
    elif redis["status"] != "ok":
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    # Without its LISTEN connection this process keeps credentials only briefly, and
    # revocations reach it late by as much: worth knowing, not an outage.
    listening = svc.authenticator.listening
    if (
        not listening or workers["status"] != "ok" or decision["status"] != "ok"
    ) and status == "ok":
        status = "degraded"
    body = {
        "status": status,
        "components": {
            "postgres": postgres,
            "redis": redis,
            "credential_changes": {"status": "ok" if listening else "down"},
            "workers": workers,
            "decision_service": decision,
        },
    }
    return Response(orjson.dumps(body), status_code=code, media_type="application/json")


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text exposition format"}},
)
async def metrics(request: Request) -> Response:
    svc = services(request)
    update_pool_gauges(svc)
    try:
        await asyncio.wait_for(update_healing_gauges(svc), _CHECK_TIMEOUT_S)
    except Exception as exc:  # the process's own metrics are still worth serving
        log.warning("healing_gauges_failed", error=f"{type(exc).__name__}: {exc}"[:300])
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)


async def update_healing_gauges(svc: Services) -> None:
    """What Prometheus alerts on (incidents waiting for ops, attempts under way, undelivered
    notifications), read at scrape time through indexed statuses: the workers keep no
    counters of their own that could disagree with the database."""
    async with svc.engine.connect() as conn:
        incidents = await repository.open_incident_counts(conn)
        attempts = await repository.in_flight_attempt_counts(conn)
        outbox = await repository.undelivered_outbox_counts(conn)
        OPEN_INCIDENTS.clear()
        for status, severity, count in incidents:
            OPEN_INCIDENTS.labels(status, severity).set(count)
        ATTEMPTS_IN_FLIGHT.clear()
        for status, count in attempts:
            ATTEMPTS_IN_FLIGHT.labels(status).set(count)
        OUTBOX_WAITING.clear()
        for kind, state, count in outbox:
            OUTBOX_WAITING.labels(kind, state).set(count)


def update_pool_gauges(svc: Services) -> None:
    pool: Any = svc.engine.pool
    DB_POOL.labels("size").set(pool.size())
    DB_POOL.labels("checked_out").set(pool.checkedout())
    DB_POOL.labels("idle").set(pool.checkedin())
    DB_POOL.labels("overflow").set(max(0, pool.overflow()))
