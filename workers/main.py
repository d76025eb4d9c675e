"""The arq worker: `selfheal worker`, also started by `selfheal up`.

Periodic detection without a scheduler of its own: every worker, every
SELFHEAL_DETECT_EVERY_S seconds, enqueues the job `detect` with the id of the current tick.
arq refuses a second job with an id it already has, so the whole fleet of workers runs one
detection per tick, on whichever worker takes it, and a tick missed by a dead worker is
enqueued by the others. The job itself is safe to run twice (database constraints dedupe).

Health: arq writes `<queue>:health-check` in Redis every few seconds; GET /health reads it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from arq import Worker
from arq.connections import ArqRedis, RedisSettings

from app.core.db import create_engine, create_sessionmaker
from app.core.logging import configure_logging
from app.core.redis import health_check_key, queue_name
from app.core.settings import Settings
from app.incidents.detection import detect_once

log = structlog.get_logger("selfheal.worker")

HEALTH_CHECK_INTERVAL_S = 5


async def detect(ctx: dict[str, Any]) -> dict[str, int]:
    result = await detect_once(ctx["sessionmaker"], ctx["settings"])
    return {"opened": result.opened, "resolved": result.resolved}


async def _enqueue_ticks(redis: ArqRedis, settings: Settings) -> None:
    period = settings.detect_every_s
    while True:
        tick = int(time.time() // period)
        try:
            await redis.enqueue_job(
                "detect", _job_id=f"detect:{tick}", _queue_name=queue_name(settings)
            )
        except Exception as exc:  # Redis away: the next tick tries again
            log.warning("detect_enqueue_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        await asyncio.sleep(max(0.05, (tick + 1) * period - time.time()))


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    engine = create_engine(settings, role="worker")
    ctx["engine"] = engine
    ctx["sessionmaker"] = create_sessionmaker(engine)
    ctx["ticker"] = asyncio.create_task(_enqueue_ticks(ctx["redis"], settings))
    log.info("worker_started", queue=queue_name(settings), detect_every_s=settings.detect_every_s)


async def _shutdown(ctx: dict[str, Any]) -> None:
    ticker = ctx.get("ticker")
    if ticker is not None:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    engine = ctx.get("engine")
    if engine is not None:
        await engine.dispose()
    log.info("worker_stopped")


def build_worker(settings: Settings, *, handle_signals: bool = True) -> Worker:
    assert settings.redis_url is not None
    return Worker(
        functions=[detect],
        queue_name=queue_name(settings),
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        # The queue is polled this often: it bounds how late a tick's job starts.
        poll_delay=0.1,
        health_check_key=health_check_key(settings),
        # A tick's result is not needed; its id only has to outlive the tick.
        keep_result=max(60, int(settings.detect_every_s * 4)),
        job_timeout=max(30, int(settings.detect_every_s * 10)),
        max_tries=1,
        # Graceful: on SIGTERM, jobs under way get this long to finish.
        job_completion_wait=10,
        handle_signals=handle_signals,
    )


def run_worker(settings: Settings) -> None:
    configure_logging(settings.log_level)
    build_worker(settings).run()
