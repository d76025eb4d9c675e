"""The worker: `selfheal worker`, also started by `selfheal up`.

Two lanes (workers/lanes.py):
- ticks: every SELFHEAL_DETECT_EVERY_S seconds each worker claims the tick in Redis
  (`SET NX`), and the one that wins runs `detect`, `heal` and `deliver` in its own process at
  once; `prune` once a minute, `seal` every SELFHEAL_AUDIT_SEAL_EVERY_S. So the whole fleet of
  workers runs one detection per tick, a tick missed by a dead worker is taken by the others,
  and ticks never wait behind per-incident work. The jobs are safe to run twice (database
  constraints dedupe, claims skip locked rows).
- steps: arq's queue. The job `heal` claims the incidents that are due and enqueues one
  `advance` job per incident, so the steps of many incidents spread over every worker
  (app/healing/engine.py). `deliver` sends what waits in the outbox (notifications,
  decision-service feedback).

Health: arq writes `<queue>:health-check` in Redis every few seconds; GET /health reads it.
Each worker also publishes the state of its decision-service circuit breaker
(`decision_breaker_key`), which /health reports, and serves its own metrics (job delay and
duration per lane, queue depth, breaker state) on SELFHEAL_WORKER_METRICS_PORT
(workers/metrics.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import httpx
import orjson
import structlog
from arq import Worker
from arq.connections import ArqRedis, RedisSettings
from arq.worker import func

from app.audit.service import seal_history
from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker, warn_about_privileges
from app.core.errors import DomainError
from app.core.jobs import current_job_id, dump_job, load_job
from app.core.logging import configure_logging
from app.core.redis import decision_breaker_key, health_check_key, queue_name
from app.core.settings import Settings
from app.decisions.breaker import CircuitBreaker
from app.decisions.client import DecisionClient
from app.decisions.fallback import FallbackRules
from app.healing.engine import Healer
from app.healing.staging import StagingClient
from app.incidents.detection import detect_once
from app.notifications.delivery import deliver_due
from app.notifications.egress import WebhookPolicy, webhook_client
from app.plugins.retention import prune_heartbeats
from workers.lanes import Tick, TickLane
from workers.metrics import (
    JOB_DELAY,
    JOB_DURATION,
    JOBS,
    serve_metrics,
    set_breaker_state,
)

log = structlog.get_logger("selfheal.worker")

HEALTH_CHECK_INTERVAL_S = 5
PRUNE_EVERY_S = 60

Job = TypeVar("Job", bound=Callable[..., Awaitable[Any]])


def reporting_domain_errors(job: Job) -> Job:
    """Where the worker maps a DomainError (app/core/errors.py): a job that meets one (a
    release gone, a state that forbids the step) logs one warning naming it and ends; it is
    not retried, and the next tick looks again. Anything else is a crash arq reports."""

    @functools.wraps(job)
    async def run(ctx: dict[str, Any], *args: Any) -> Any:
        try:
            return await job(ctx, *args)
        except DomainError as exc:
            log.warning(
                "job_refused",
                job=job.__name__,
                kind=type(exc).__name__,
                error=exc.message,
                field=exc.field,
            )
            return {"refused": type(exc).__name__}

    return cast(Job, run)


@reporting_domain_errors
async def detect(ctx: dict[str, Any]) -> dict[str, int]:
    result = await detect_once(ctx["sessionmaker"], ctx["settings"])
    return {"opened": result.opened, "resolved": result.resolved}


@reporting_domain_errors
async def heal(ctx: dict[str, Any]) -> dict[str, int]:
    """Claim the incidents that are due and hand each to an `advance` job (any worker)."""
    healer: Healer = ctx["healer"]
    await _publish_breaker(ctx)
    redis: ArqRedis = ctx["redis"]
    # Claim no more than the queue can take: a claim is a lease, and a job that waits in a
    # long queue past its lease gets claimed again, which only lengthens the queue. The
    # backlog stays under SELFHEAL_HEAL_BATCH jobs, whatever the number of due incidents.
    waiting = await redis.zcard(queue_name(ctx["settings"]))
    room = ctx["settings"].heal_batch - int(waiting)
    if room <= 0:
        return {"claimed": 0, "sql_rollbacks": 0, "queue_full": 1}
    claimed = await healer.claim_due(limit=room)
    stamp = time.time_ns()
    for incident_id in claimed:
        await redis.enqueue_job(
            "advance",
            str(incident_id),
            _job_id=f"advance:{incident_id}:{stamp}",
            _queue_name=queue_name(ctx["settings"]),
        )
    rollbacks = await healer.follow_sql_rollbacks()
    return {"claimed": len(claimed), "sql_rollbacks": rollbacks, "queue_full": 0}


@reporting_domain_errors
async def advance(ctx: dict[str, Any], incident_id: str) -> str | None:
    healer: Healer = ctx["healer"]
    started = time.time()
    # arq's score: when the job was due (its enqueue time), in ms.
    JOB_DELAY.labels("steps", "advance").observe(max(0.0, started - ctx["score"] / 1000))
    outcome = "failed"
    try:
        moved = await healer.advance(uuid.UUID(incident_id))
        outcome = "ok"
        return moved
    except DomainError:
        outcome = "refused"
        raise
    finally:
        JOB_DURATION.labels("steps", "advance").observe(time.time() - started)
        JOBS.labels("steps", "advance", outcome).inc()


@reporting_domain_errors
async def deliver(ctx: dict[str, Any]) -> dict[str, int]:
    settings: Settings = ctx["settings"]
    result = await deliver_due(
        ctx["sessionmaker"],
        ctx["webhooks"],
        ctx["box"],
        decision_client=ctx["decisions"],
        max_attempts=settings.outbox_max_attempts,
        max_backoff_s=settings.outbox_backoff_max_s,
        request_timeout_s=settings.webhook_timeout_s,
    )
    return {"delivered": result.delivered, "retried": result.retried, "dead": result.dead}


@reporting_domain_errors
async def prune(ctx: dict[str, Any]) -> dict[str, int]:
    """Heartbeat partitions: made ahead, expired ones dropped whole (app/plugins/retention.py)."""
    settings: Settings = ctx["settings"]
    upkeep = await prune_heartbeats(ctx["sessionmaker"], settings)
    if upkeep.created or upkeep.dropped:
        log.info("heartbeat_partitions", created=upkeep.created, dropped=list(upkeep.dropped))
    if upkeep.busy:
        # A lock was not free within 3 s: nothing done, the next minute tries again.
        log.info("heartbeat_partitions_busy", retry_in_s=PRUNE_EVERY_S)
    return {"created": upkeep.created, "dropped": len(upkeep.dropped)}


@reporting_domain_errors
async def seal(ctx: dict[str, Any]) -> dict[str, int]:
    """Seal the history's new rows and export the head (app/audit)."""
    result = await seal_history(ctx["sessionmaker"], ctx["settings"])
    return {"sealed": result.sealed}


async def _publish_breaker(ctx: dict[str, Any]) -> None:
    decisions: DecisionClient = ctx["decisions"]
    snapshot = decisions.breaker.snapshot() | {"at": time.time()}
    set_breaker_state(str(snapshot["state"]))
    with contextlib.suppress(Exception):  # health reporting must not stop healing
        await ctx["redis"].hset(
            decision_breaker_key(ctx["settings"]), ctx["worker_name"], orjson.dumps(snapshot)
        )


def tick_lane(ctx: dict[str, Any]) -> TickLane:
    """The ticks this worker takes its share of (workers/lanes.py): detection, the healing
    loop's claims and the outbox every SELFHEAL_DETECT_EVERY_S; retention once a minute; the
    seals every SELFHEAL_AUDIT_SEAL_EVERY_S (the first at start-up)."""
    settings: Settings = ctx["settings"]
    period = settings.detect_every_s
    return TickLane(
        ctx,
        [
            Tick("detect", period, detect),
            Tick("heal", period, heal),
            Tick("deliver", period, deliver),
            Tick("prune", PRUNE_EVERY_S, prune),
            Tick("seal", settings.audit_seal_every_s, seal),
        ],
        redis=ctx["redis"],
        key_prefix=settings.redis_prefix,
        owner=ctx["worker_name"],
        timeout_s=job_timeout_s(settings),
        queue=queue_name(settings),
    )


def job_timeout_s(settings: Settings) -> int:
    # A step's outside calls are bounded (decision and staging deadlines); the lease
    # (SELFHEAL_HEAL_LEASE_S) hands an incident to another worker if one hangs anyway.
    return max(120, int(settings.detect_every_s * 10))


def service_clients(
    settings: Settings, http: httpx.AsyncClient
) -> tuple[DecisionClient, StagingClient]:
    """The clients of the decision service and the staging runner, as the settings say
    (deadlines, retries, the breaker, how much of an answer is read)."""
    decisions = DecisionClient(
        http,
        base_url=settings.sira_api_url,
        token=settings.sira_api_token,
        deadline_s=settings.decision_deadline_s,
        max_attempts=settings.decision_max_attempts,
        breaker=CircuitBreaker(
            failure_threshold=settings.decision_breaker_failures,
            cool_down_s=settings.decision_breaker_cool_down_s,
            on_change=lambda old, new: log.warning("decision_breaker_changed", old=old, new=new),
        ),
        rules=FallbackRules(
            min_samples=settings.fallback_min_samples,
            min_success_rate=settings.fallback_min_success_rate,
        ),
        max_answer_bytes=settings.service_answer_max_bytes,
    )
    staging = StagingClient(
        http,
        base_url=settings.staging_runner_url,
        token=settings.staging_runner_token,
        deadline_s=settings.staging_deadline_s,
        max_answer_bytes=settings.service_answer_max_bytes,
    )
    return decisions, staging


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    engine = create_engine(settings, role="worker")
    ctx["engine"] = engine
    ctx["sessionmaker"] = create_sessionmaker(engine)
    await warn_about_privileges(engine, settings.db_timeout_s)
    ctx["worker_name"] = f"{socket.gethostname()}:{os.getpid()}"
    # One HTTP client for every outside service: pooled connections, bounded waits.
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, connect=3.0),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        follow_redirects=False,
    )
    ctx["http"] = http
    # Webhooks have their own client: every connection to a checked address (SSRF guard).
    ctx["webhooks"] = webhook_client(WebhookPolicy.from_settings(settings))
    ctx["box"] = SecretBox.for_settings(settings)
    decisions, staging = service_clients(settings, http)
    ctx["decisions"] = decisions
    ctx["healer"] = Healer(ctx["sessionmaker"], settings, decisions, staging)
    serve_metrics(settings.worker_metrics_host, settings.worker_metrics_port)
    lane = tick_lane(ctx)
    ctx["lane"] = lane
    ctx["ticker"] = asyncio.create_task(lane.run_forever(), name="tick-lane")
    log.info("worker_started", queue=queue_name(settings), detect_every_s=settings.detect_every_s)


async def _shutdown(ctx: dict[str, Any]) -> None:
    ticker = ctx.get("ticker")
    if ticker is not None:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    lane: TickLane | None = ctx.get("lane")
    if lane is not None:
        await lane.stop()
    for client in (ctx.get("http"), ctx.get("webhooks")):
        if client is not None:
            await client.aclose()
    engine = ctx.get("engine")
    if engine is not None:
        await engine.dispose()
    log.info("worker_stopped")


class JsonWorker(Worker):
    """arq's worker with jobs and results in JSON (app/core/jobs.py), never pickle; each job
    runs with its id in `current_job_id`, so a refused job is logged by its id."""

    async def run_job(self, job_id: str, score: int) -> None:
        token = current_job_id.set(job_id)
        try:
            await super().run_job(job_id, score)
        finally:
            current_job_id.reset(token)


def build_worker(settings: Settings, *, handle_signals: bool = True) -> Worker:
    assert settings.redis_url is not None
    # A missing, public or short SELFHEAL_SECRET_KEY stops the worker before it takes a job
    # (WeakSecretKey says what to do).
    SecretBox.for_settings(settings)
    return JsonWorker(
        # `advance` results are never read, and its job ids are unique per claim: no need to
        # keep them. The tick jobs run in the tick lane (workers/lanes.py); they stay
        # registered here so that what an older worker enqueues during a rolling upgrade runs.
        functions=[detect, heal, func(advance, keep_result=0), deliver, prune, seal],
        # Steps mostly wait on HTTP and PostgreSQL; the pool (SELFHEAL_DB_POOL_SIZE plus as
        # many overflow) bounds what runs against the database at once.
        max_jobs=2 * settings.db_pool_size,
        queue_name=queue_name(settings),
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        # JSON, not pickle: whoever writes to Redis must not run code in the workers.
        job_serializer=dump_job,
        job_deserializer=load_job,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        # The queue is polled this often: it bounds how late a tick's job starts.
        poll_delay=0.1,
        health_check_key=health_check_key(settings),
        # Results are not read (an older worker's tick ids only had to outlive the tick).
        keep_result=max(60, int(settings.detect_every_s * 4)),
        job_timeout=job_timeout_s(settings),
        max_tries=1,
        # Graceful: on SIGTERM, jobs under way get this long to finish.
        job_completion_wait=10,
        handle_signals=handle_signals,
    )


class QuietJobLines(logging.Filter):
    """arq logs two lines per job at info level: with six tick jobs a second, an idle worker
    would print a dozen lines a second. Those lines are left for LOG_LEVEL=debug; jobs log
    at info themselves when something happened (an incident opened or moved, a delivery
    failed), and arq's failures (warning, error) still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("deserializing job"):
            return False  # a refused job: `job_refused_not_json` (app/core/jobs.py) says it
        if record.levelno > logging.INFO:
            return True
        message = str(record.msg)
        return not message.startswith(("%6.2fs", "recording health"))


def run_worker(settings: Settings) -> None:
    configure_logging(settings.log_level)
    if settings.log_level != "debug":
        logging.getLogger("arq.worker").addFilter(QuietJobLines())
    # A lost Redis ends arq's run(); workers/reconnect.py waits for it and starts afresh.
    from workers.reconnect import run_until_stopped

    run_until_stopped(lambda: build_worker(settings), settings)
