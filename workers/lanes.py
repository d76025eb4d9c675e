"""Ticks in their own lane: detect, heal, deliver, prune and seal never wait behind
per-incident work.

Until issue 11 the ticks were arq jobs in the one FIFO queue that also carries the `advance`
jobs (one per incident step). Under a burst (200 sick plugins), a tick's job waited 1-4 s
behind steps that themselves wait on the decision service and staging: detection slowed down
exactly when the fleet needed it. Now:

- `steps` lane: arq's queue, `advance` jobs only (and whatever an older worker enqueues during
  a rolling upgrade: the tick functions stay registered with arq).
- `ticks` lane: this module. Every worker wakes at each tick boundary and claims the tick in
  Redis (`SET <prefix>tick:<job>:<n> NX EX`, one round trip per job and tick); the worker
  that wins runs the job in its own process, as a task beside arq's, at once. The claim is what
  arq's job id did before (one run per tick fleet-wide, a tick missed by a dead worker is run
  by the next one that wakes), without the queue in between.

A worker still running its previous `detect` when the next tick comes does not claim it
(`selfheal_worker_ticks_skipped_total`): another worker takes it, or the next tick does. So a
slow tick never piles up behind itself, and ticks never run more than once per process at a
time. The jobs are safe to run concurrently across workers (SKIP LOCKED claims and database
constraints), as they were under arq.

What a tick costs: one SET per job and tick per worker; the claim keys expire after
max(10 s, 4 periods), so Redis holds a bounded number of them whatever the uptime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from arq.connections import ArqRedis

from workers.metrics import JOB_DELAY, JOB_DURATION, JOBS, QUEUE_DEPTH, TICKS_SKIPPED

log = structlog.get_logger("selfheal.worker")

TickJob = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Tick:
    name: str
    period_s: float
    job: TickJob


class TickLane:
    """Runs `ticks` in this process, each claimed fleet-wide per period (module docstring)."""

    def __init__(
        self,
        ctx: dict[str, Any],
        ticks: list[Tick],
        *,
        redis: ArqRedis,
        key_prefix: str,
        owner: str,
        timeout_s: float,
        queue: str,
    ) -> None:
        self.ctx = ctx
        self.ticks = ticks
        self.redis = redis
        self.key_prefix = key_prefix
        self.owner = owner
        self.timeout_s = timeout_s
        self.queue = queue
        self.running: dict[str, asyncio.Task[None]] = {}
        self._last: dict[str, int] = {}
        # A tick is due at its period's start, or when this worker started if later (the first
        # `prune` after a start is not a minute late).
        self._started = time.time()

    async def run_forever(self) -> None:
        while True:
            now = time.time()
            for tick in self.ticks:
                stamp = int(now // tick.period_s)
                if self._last.get(tick.name) == stamp:
                    continue
                self._last[tick.name] = stamp
                if tick.name in self.running:
                    TICKS_SKIPPED.labels(tick.name).inc()
                    continue
                if await self._claim(tick, stamp):
                    due = max(stamp * tick.period_s, self._started)
                    self.running[tick.name] = asyncio.create_task(
                        self._run(tick, due), name=f"tick:{tick.name}:{stamp}"
                    )
            await self._sample_queue()
            await asyncio.sleep(self._until_next_boundary())

    async def stop(self) -> None:
        """Let the ticks under way finish (they are short and bounded by their timeout)."""
        if self.running:
            await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def _claim(self, tick: Tick, stamp: int) -> bool:
        key = f"{self.key_prefix}tick:{tick.name}:{stamp}"
        ttl = max(10, int(tick.period_s * 4) + 1)
        try:
            return bool(await self.redis.set(key, self.owner, nx=True, ex=ttl))
        except Exception as exc:  # Redis away: nobody can claim; the next tick tries again
            log.warning(
                "tick_claim_failed", job=tick.name, error=f"{type(exc).__name__}: {exc}"[:200]
            )
            return False

    async def _run(self, tick: Tick, due: float) -> None:
        started = time.time()
        JOB_DELAY.labels("ticks", tick.name).observe(max(0.0, started - due))
        outcome = "ok"
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await tick.job(self.ctx)
            if isinstance(result, dict) and "refused" in result:
                outcome = "refused"
        except TimeoutError:
            outcome = "timeout"
            log.error("tick_timed_out", job=tick.name, timeout_s=self.timeout_s)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "failed"
            log.exception("tick_failed", job=tick.name)
        finally:
            JOB_DURATION.labels("ticks", tick.name).observe(time.time() - started)
            JOBS.labels("ticks", tick.name, outcome).inc()
            self.running.pop(tick.name, None)

    async def _sample_queue(self) -> None:
        QUEUE_DEPTH.labels("ticks").set(len(self.running))
        with contextlib.suppress(Exception):  # metrics never stop the ticks
            QUEUE_DEPTH.labels("steps").set(await self.redis.zcard(self.queue))

    def _until_next_boundary(self) -> float:
        now = time.time()
        nxt = min((int(now // t.period_s) + 1) * t.period_s for t in self.ticks)
        return max(0.01, nxt - now)
