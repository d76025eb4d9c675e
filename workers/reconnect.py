"""A worker that outlives a Redis restart.

arq's `Worker.run()` does not survive Redis going away: its poll loop lets the connection error
out, and `close()` then fails on the same error before it runs `on_shutdown`. The process
exited, and nothing started it again unless a supervisor did (`selfheal up` does not). Found
by tests/test_faults.py (the Redis restart under load). Here the failed worker's own shutdown
runs (its engine, HTTP clients and tick lane are closed), we wait until Redis answers again,
and a new worker is built and run: the incidents it leases are in PostgreSQL, and its jobs
are re-queued by the ticks, so nothing is lost by starting afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import structlog
from arq import Worker
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.core.settings import Settings

log = structlog.get_logger("selfheal.worker")

# How often Redis is asked whether it is back: recovery within about this much of its return.
REDIS_POLL_S = 0.5
# The failed worker's on_shutdown gets this long (it closes pools; a stuck close must not
# keep the worker from coming back).
SHUTDOWN_WAIT_S = 10.0


def run_until_stopped(build: Callable[[], Worker], settings: Settings) -> None:
    """Run workers made by `build` until one returns (SIGTERM, SIGINT): a worker that fails on
    a lost Redis is shut down and replaced once Redis answers."""
    while True:
        worker = build()
        try:
            worker.run()
            return
        except (RedisError, OSError) as exc:
            log.warning(
                "worker_lost_redis",
                error=f"{type(exc).__name__}: {exc}"[:300],
                retry_every_s=REDIS_POLL_S,
            )
        loop = worker.loop
        # SIGTERM and SIGINT are ours until the next worker installs its own handlers. They
        # are the loop's handlers, as arq's were: a signal that came in between waits in the
        # loop's self-pipe and reaches ours, where a plain signal.signal handler would miss it.
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.run_until_complete(_finish(worker))
        if not loop.run_until_complete(wait_for_redis(settings, stopping)):
            return
        log.info("worker_redis_back")


async def _finish(worker: Worker) -> None:
    """What arq's close() did not get to: on_shutdown, and the pool's sockets."""
    if worker.on_shutdown is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.on_shutdown(worker.ctx), SHUTDOWN_WAIT_S)
    pool = getattr(worker, "_pool", None)
    if pool is not None:
        with contextlib.suppress(Exception):
            await pool.close(close_connection_pool=True)
        worker._pool = None


async def wait_for_redis(settings: Settings, stopping: asyncio.Event) -> bool:
    """Until Redis answers a PING (True), or `stopping` is set (False: stop)."""
    client = Redis.from_url(
        settings.redis_url or "", socket_timeout=REDIS_POLL_S, socket_connect_timeout=REDIS_POLL_S
    )
    try:
        while not stopping.is_set():
            with contextlib.suppress(RedisError, OSError):
                if await client.ping():
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), REDIS_POLL_S)
        return False
    finally:
        await client.aclose()
