"""Processes killed and servers stopped under load (issue 11, "Fault and load tests"): the short
versions of bench/faults.py, which runs the same scenarios (tests/support/faults.py) at full
length and prints their figures. Real `selfheal api` and `selfheal worker` processes, the
reference decision service and staging runner as processes, and a private PostgreSQL or Redis
(the embedded servers) for the restarts: the machine's shared servers are never stopped."""

from __future__ import annotations

import asyncio
import random
import signal

import pytest

from tests.support import faults
from tests.support.ports import free_port

pytestmark = [pytest.mark.long_e2e, pytest.mark.timeout(300)]


def seed() -> int:
    """A new seed each run, printed (pytest shows it with a failure) so a run can be replayed."""
    value = random.SystemRandom().randrange(2**32)
    print(f"seed={value}")
    return value


async def test_workers_killed_mid_step_lose_nothing_and_send_nothing_twice(settings, tmp_path):
    run = settings.model_copy(update={"data_dir": tmp_path / "data", "port": free_port()})
    report = await faults.worker_kills(run, tmp_path, kills=3, seed=seed(), workers=2)
    print(report.figures())
    assert report.violations == []
    assert report.kills == 3
    assert report.incidents >= report.plugins_started > 0
    assert report.deliveries_plugin_side == report.commands > 0


async def test_api_killed_under_load_every_heartbeat_stored_once(settings, tmp_path):
    run = settings.model_copy(update={"data_dir": tmp_path / "data", "port": free_port()})
    report = await faults.api_kills(run, tmp_path, kills=1, seed=seed(), concurrency=8)
    print(report.figures())
    assert report.violations == []
    assert report.kills == 1
    # Every heartbeat the plugins built is stored once (or was never sent: a copy replaced by
    # a newer one after a definite refusal), and the requests they counted are stored once.
    assert report.duplicates == 0
    assert report.requests_stored == report.requests_counted > 100
    assert report.stored > 100


async def test_postgres_restart_503_then_recovery(servers, redis_prefix, tmp_path):
    async with faults.private_postgres(tmp_path, servers.redis_url, redis_prefix) as (pg, run):
        report = await faults.outage(run, tmp_path, pg)
    print(report.figures())
    assert report.violations == []
    assert report.statuses_during.get("503", 0) > 0
    # The rest of the API says 503 too: the ops API, a plugin's ack, a dashboard page.
    for request in faults.PROBES:
        assert report.others_during.get(f"{request} 503", 0) > 0, report.others_during
    assert report.worker_recovery_s is not None


async def test_redis_restart_no_500_then_recovery(database_url, redis_prefix, tmp_path):
    async with faults.private_redis(tmp_path, database_url, redis_prefix) as (redis, run):
        report = await faults.outage(run, tmp_path, redis)
    print(report.figures())
    assert report.violations == []
    assert report.worker_recovery_s is not None


async def test_worker_waiting_for_redis_stops_on_sigterm(database_url, redis_prefix, tmp_path):
    """The wait for a lost Redis (workers/reconnect.py) is not a hang: SIGTERM ends it, and
    the worker exits 0 as on a normal stop."""
    async with faults.private_redis(tmp_path, database_url, redis_prefix) as (redis, run):
        worker = faults.start_worker(faults.service_env(run), tmp_path / "worker.log")
        try:
            faults.wait_workers_healthy(run, [worker])
            await asyncio.to_thread(redis.stop)
            await faults.until(
                lambda: "worker_lost_redis" in worker.tail(), 60, "the worker to lose Redis"
            )
            assert worker.alive(), worker.tail()
            worker.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(worker.proc.wait, 10) == 0, worker.tail()
        finally:
            worker.stop()
            await asyncio.to_thread(redis.start)  # private_redis stops it again
