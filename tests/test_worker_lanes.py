"""Ticks in their own lane (workers/lanes.py) and the worker's own metrics (workers/metrics.py),
with real `selfheal worker` processes, the reference decision service as a real process, and
signed heartbeats through the real API.

The burst test is the property users need: while every slot of the steps lane waits on a
decision service that takes its time, a new sick plugin still gets its incident within a
tick or two. With the ticks queued in arq's one FIFO (before issue 11), its detection waited
for a free slot: until the decision deadline ended the calls under way."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from app.core.settings import Settings
from tests.support.healing import FAILING_WEBHOOKS, add_release, beat, healing_loop
from tests.support.plugins import Plugin, register
from tests.support.ports import free_port
from tests.support.services import RUNNER_TOKEN, SIRA_TOKEN, Server
from tests.support.settings import settings_env
from tests.test_healing_workers import wait_for, workers

pytestmark = pytest.mark.timeout(300)

# Longer than the wait for the new incident below: before the lanes, the incident could not
# open before these calls ended.
DECISION_DEADLINE_S = 45


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def serving(port: int) -> bool:
    try:
        scrape(port)
    except httpx.TransportError:
        return False
    return True


def worker_env(settings: Settings, sira: Server, runner: Server, **extra: str) -> dict[str, str]:
    """The worker at default settings but for the services it talks to and `extra`."""
    env = settings_env(settings)
    env.update(
        SIRA_API_URL=sira.url,
        SIRA_API_TOKEN=SIRA_TOKEN,
        STAGING_RUNNER_URL=runner.url,
        STAGING_RUNNER_TOKEN=RUNNER_TOKEN,
        SELFHEAL_DATA_DIR=str(settings.data_dir),
        SELFHEAL_DETECT_EVERY_S=str(Settings().detect_every_s),
        **extra,
    )
    return env


@pytest.fixture
def lane_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"data_dir": tmp_path, "port": free_port()})


async def test_detection_runs_while_every_step_waits_on_the_decision_service(
    lane_settings: Settings, db, tmp_path: Path, sira_server: Server, runner_server: Server
) -> None:
    sira_server.control(mode="slow", slow_s=DECISION_DEADLINE_S + 15)
    runner_server.control(mode="normal", fail_versions=[], delay_s=0.1)
    slots = 2 * lane_settings.db_pool_size  # the worker's max_jobs (workers/main.py)
    fleet: list[Plugin] = [
        await register(lane_settings, tenant=f"merchant-{n}", name=f"plugin-{n}")
        for n in range(slots + 5)
    ]
    late = await register(lane_settings, tenant="merchant-late", name="late")
    await add_release(lane_settings, tmp_path, "late", "1.0.1")
    metrics_port = free_port()
    env = worker_env(
        lane_settings,
        sira_server,
        runner_server,
        SELFHEAL_DECISION_DEADLINE_S=str(DECISION_DEADLINE_S),
        SELFHEAL_DECISION_MAX_ATTEMPTS="1",
        SELFHEAL_WORKER_METRICS_PORT=str(metrics_port),
    )
    async with healing_loop(lane_settings) as loop:  # its API client only
        with workers(1, env, lane_settings):
            for plugin in fleet:
                await beat(loop, plugin, "1.0.0", FAILING_WEBHOOKS)
            # Every slot of the steps lane now waits on the slow decision service.
            await asyncio.to_thread(
                wait_for,
                lambda: sira_server.decide_calls() >= slots,
                120,
                f"{slots} decision calls under way",
                db,
            )
            calls_before = sira_server.decide_calls()
            started = time.monotonic()
            await beat(loop, late, "1.0.0", FAILING_WEBHOOKS)
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    db.execute(
                        "SELECT count(*) FROM plugin_incidents WHERE installation_id = %s",
                        (late.id,),
                    ).fetchone()[0]
                    == 1
                ),
                DECISION_DEADLINE_S - 10,
                "the late plugin's incident, while the steps lane is full",
                db,
            )
            waited = time.monotonic() - started
            # Still within the calls under way: no slot came free in between.
            assert waited < DECISION_DEADLINE_S, waited
            assert sira_server.decide_calls() >= calls_before
            page = scrape(metrics_port)
    # The worker's own metrics: both lanes, the queue, the breaker.
    assert metric(page, "selfheal_worker_jobs_total", lane="ticks", job="detect", outcome="ok") > 0
    assert metric(page, "selfheal_worker_job_delay_seconds_count", lane="ticks", job="detect") > 0
    assert metric(page, "selfheal_worker_job_delay_seconds_count", lane="ticks", job="heal") > 0
    assert re.search(r'selfheal_worker_queue_depth\{lane="steps"\} \d', page)
    assert metric(page, "selfheal_worker_decision_breaker_state", state="closed") == 1


async def test_two_workers_run_each_tick_once(
    lane_settings: Settings, db, sira_server: Server, runner_server: Server
) -> None:
    sira_server.control(mode="normal")
    ports = [free_port(), free_port()]
    period = Settings().detect_every_s
    envs = [
        worker_env(
            lane_settings,
            sira_server,
            runner_server,
            SELFHEAL_WORKER_METRICS_PORT=str(port),
        )
        for port in ports
    ]
    # Two processes with their own environment each (their own metrics port).
    with workers(1, envs[0], lane_settings), workers(1, envs[1], lane_settings):

        def runs() -> float:
            return sum(
                metric(scrape(port), "selfheal_worker_jobs_total", lane="ticks", job="detect")
                for port in ports
            )

        for port in ports:  # the health key says one worker is up, not both
            await asyncio.to_thread(wait_for, lambda p=port: serving(p), 60, "worker metrics")
        start_runs = runs()
        started = time.time()
        await asyncio.to_thread(wait_for, lambda: runs() >= start_runs + 10, 60, "ten ticks")
        elapsed_ticks = (time.time() - started) / period
        done = runs() - start_runs
        per_worker = [
            metric(scrape(port), "selfheal_worker_jobs_total", lane="ticks", job="detect")
            for port in ports
        ]
    # One run per tick fleet-wide (two workers without the claim would make it twice as many);
    # +2 for the ticks at both ends of the measured span.
    assert done <= elapsed_ticks + 2, (done, elapsed_ticks, per_worker)
