"""The healing loop with many workers and crashes: real `selfheal worker` processes, the
reference decision service and staging runner as real processes, the kill switch typed in
psql while workers queue commands as fast as they can (and a control run without the policy
lock, to show the check can catch a violation), and a worker SIGKILLed mid-patch."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis import Redis as SyncRedis
from sqlalchemy import text

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings, libpq_url
from app.healing import repository as repo
from app.plugins.repository import insert_command
from app.policy import repository as policy_repo
from app.policy.gate import ProposedAction, evaluate
from tests.support.healing import (
    FAILING_WEBHOOKS,
    HEALTHY,
    ack,
    add_release,
    beat,
    enable_autopatch,
    healing_loop,
)
from tests.support.plugins import Plugin, register
from tests.support.ports import free_port
from tests.support.services import RUNNER_TOKEN, SIRA_TOKEN, Server
from tests.support.settings import REPO, settings_env

# Waits allow for one lease takeover (SELFHEAL_HEAL_LEASE_S=5 here, plus queueing on a busy
# machine): a step that times out on a lock is redone by the next claim, which is correct.
pytestmark = pytest.mark.timeout(360)


def worker_env(settings: Settings, sira: Server, runner: Server, **extra: str) -> dict[str, str]:
    env = settings_env(settings)
    env.update(
        SIRA_API_URL=sira.url,
        SIRA_API_TOKEN=SIRA_TOKEN,
        STAGING_RUNNER_URL=runner.url,
        STAGING_RUNNER_TOKEN=RUNNER_TOKEN,
        SELFHEAL_DATA_DIR=str(settings.data_dir),
        SELFHEAL_HEAL_POLL_S="0.1",
        SELFHEAL_HEAL_LEASE_S="5",
        SELFHEAL_HEALTH_WINDOW_S="30",
        SELFHEAL_DETECT_EVERY_S="0.2",
        **extra,
    )
    return env


@contextlib.contextmanager
def workers(
    count: int, env: dict[str, str], settings: Settings
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [
        subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, cwd=REPO)
        for _ in range(count)
    ]
    client = SyncRedis.from_url(settings.redis_url or "")
    try:
        deadline = time.monotonic() + 30
        while not client.exists(f"{settings.redis_prefix}arq:queue:health-check"):
            for proc in procs:
                assert proc.poll() is None, f"worker exited with {proc.returncode}"
            assert time.monotonic() < deadline, "workers did not report healthy"
            time.sleep(0.05)
        yield procs
    finally:
        client.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for(predicate: Any, timeout: float = 60, what: str = "condition", db: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            seen = (
                db.execute(
                    "SELECT status, status_reason, count(*) FROM plugin_incidents GROUP BY 1, 2"
                ).fetchall()
                if db is not None
                else None
            )
            policy = (
                db.execute(
                    "SELECT autopatch_max_severity, approval_min_severity FROM ops_policy"
                ).fetchall()
                if db is not None
                else None
            )
            raise AssertionError(
                f"timed out waiting for {what}; incidents: {seen}; policy: {policy}"
            )
        time.sleep(0.1)


@pytest.fixture
def loop_settings(settings: Settings, tmp_path: Path) -> Settings:
    # The API listens for real (healing_loop): the staging runner fetches artifacts from it.
    return settings.model_copy(update={"data_dir": tmp_path, "port": free_port()})


async def test_two_workers_one_command_per_attempt_and_all_healed(
    loop_settings, db, tmp_path, sira_server, runner_server
):
    sira_server.control(mode="normal")
    runner_server.control(mode="normal", fail_versions=[], delay_s=0.1)
    fleet: list[Plugin] = [
        await register(loop_settings, tenant=f"merchant-{n}", name="payments") for n in range(12)
    ]
    for version in ("1.2.2", "1.2.3"):
        await add_release(loop_settings, tmp_path, "payments", version)
    # Twelve installations of one version failing together make a fleet incident, which
    # raises their severity to high: let the policy act on high without approvals.
    enable_autopatch(
        db,
        *(p.tenant for p in fleet),
        max_concurrent_actions=100,
        max_concurrent_actions_per_tenant=5,
        autopatch_max_severity="high",
        approval_min_severity="critical",
    )
    env = worker_env(loop_settings, sira_server, runner_server)
    async with healing_loop(loop_settings) as loop:  # only its API client and ack helpers
        with workers(2, env, loop_settings):
            for plugin in fleet:
                await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    db.execute(
                        "SELECT count(*) FROM plugin_incidents WHERE status = 'applying'"
                    ).fetchone()[0]
                    == len(fleet)
                ),
                120,
                "every incident to reach applying",
                db,
            )
            for plugin in fleet:
                got = await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
                assert len(got) == 1
                await ack(loop, plugin, got[0])
            await asyncio.sleep(1.0)
            for _ in range(loop_settings.recovery_heartbeats):
                for plugin in fleet:
                    await beat(loop, plugin, "1.2.3", HEALTHY)
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    db.execute(
                        # The installations' incidents (the fleet incident that groups them
                        # resolves after its last member, and would be a thirteenth).
                        "SELECT count(*) FROM plugin_incidents"
                        " WHERE status = 'resolved' AND installation_id IS NOT NULL"
                    ).fetchone()[0]
                    == len(fleet)
                ),
                120,
                "every incident to be resolved",
                db,
            )
    per_incident = db.execute(
        "SELECT count(*) FROM plugin_autopatch_attempts GROUP BY incident_id"
    ).fetchall()
    assert per_incident == [(1,)] * len(fleet)
    per_attempt = db.execute(
        "SELECT count(*) FROM plugin_agent_commands GROUP BY attempt_id"
    ).fetchall()
    assert per_attempt == [(1,)] * len(fleet)
    assert db.execute(
        "SELECT count(*) FROM plugin_autopatch_attempts WHERE status = 'success'"
    ).fetchone() == (len(fleet),)


async def test_worker_killed_mid_patch_another_finishes_it(
    loop_settings, db, tmp_path, sira_server, runner_server
):
    sira_server.control(mode="normal")
    # Staging takes long enough for the worker to die in the middle of it.
    runner_server.control(mode="normal", fail_versions=[], delay_s=1.5)
    plugin = await register(loop_settings)
    for version in ("1.2.2", "1.2.3"):
        await add_release(loop_settings, tmp_path, plugin.name, version)
    enable_autopatch(db, plugin.tenant)
    env = worker_env(loop_settings, sira_server, runner_server)
    async with healing_loop(loop_settings) as loop:
        with workers(1, env, loop_settings) as (first,):
            await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    db.execute(
                        "SELECT count(*) FROM plugin_autopatch_attempts WHERE status = 'staging'"
                    ).fetchone()[0]
                    == 1
                ),
                75,
                "the attempt to be in staging",
            )
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        with workers(1, env, loop_settings):
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    db.execute("SELECT status FROM plugin_incidents").fetchone()[0] == "applying"
                ),
                75,
                "another worker to take over",
                db,
            )
            assert db.execute(
                "SELECT count(*), min(status) FROM plugin_autopatch_attempts"
            ).fetchone() == (1, "applying")
            # ...and sees the incident through to the end.
            got = await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
            assert len(got) == 1
            await ack(loop, plugin, got[0])
            await asyncio.sleep(0.5)
            for _ in range(loop_settings.recovery_heartbeats):
                await beat(loop, plugin, "1.2.3", HEALTHY)
            await asyncio.to_thread(
                wait_for,
                lambda: (
                    db.execute("SELECT status FROM plugin_incidents").fetchone()[0] == "resolved"
                ),
                75,
                "the incident to be resolved",
                db,
            )
    assert db.execute("SELECT count(*), min(status) FROM plugin_autopatch_attempts").fetchone() == (
        1,
        "success",
    )
    assert db.execute("SELECT count(*) FROM plugin_agent_commands").fetchone() == (1,)


# --- the kill switch against four concurrent enqueuers --------------------------------------

VIOLATION_PROBE = """
CREATE TABLE kill_switch_violations (command_id uuid, seen_at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION probe_kill_switch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Runs at COMMIT (deferred): with READ COMMITTED it sees every transaction committed
    -- before ours. If the kill switch is already off, our command commits after the flip.
    IF NEW.automatic AND NOT (SELECT autopatch_enabled FROM ops_policy WHERE id = 1) THEN
        INSERT INTO kill_switch_violations (command_id) VALUES (NEW.id);
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER probe_kill_switch AFTER INSERT ON plugin_agent_commands
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION probe_kill_switch();
"""


async def enqueue_as_fast_as_possible(
    settings: Settings, plugins: list[Plugin], stop: asyncio.Event, *, hold_s: float
) -> int:
    """What the apply step does, in a tight loop: gate (policy read) and, if allowed, an
    attempt and its command in the same transaction; `hold_s` between the gate and the
    commit stands for the rest of a real step's work and widens the window a race needs."""
    engine = create_engine(settings, role="worker")
    maker = create_sessionmaker(engine)
    queued = 0
    try:
        while not stop.is_set():
            for plugin in plugins:
                if stop.is_set():
                    break
                async with maker() as session, session.begin():
                    incident_id = (
                        await session.execute(
                            text(
                                "INSERT INTO plugin_incidents (installation_id, tenant_id,"
                                " plugin_name, plugin_version, type, severity, status)"
                                " VALUES (:i, :t, 'payments', '1.2.2', 'error_spike', 'low',"
                                " 'cancelled') RETURNING id"
                            ),
                            {"i": plugin.id, "t": plugin.tenant},
                        )
                    ).scalar_one()
                    action = ProposedAction(
                        incident_id=incident_id,
                        installation_id=uuid.UUID(plugin.id),
                        tenant_id=plugin.tenant,
                        plugin_name="payments",
                        action="patch",
                        from_version="1.2.2",
                        to_version="1.2.3",
                        severity="low",
                        confidence=0.99,
                        automatic=True,
                        requested_by="worker",
                    )
                    gate = await evaluate(session, action)
                    if not gate.allowed:
                        await session.rollback()
                        continue
                    attempt_id = await repo.insert_attempt(
                        session,
                        incident_id=incident_id,
                        installation_id=uuid.UUID(plugin.id),
                        action="patch",
                        from_version="1.2.2",
                        to_version="1.2.3",
                        automatic=True,
                        decision_source="sira",
                        confidence=0.99,
                        requested_by="worker",
                    )
                    assert attempt_id is not None
                    await insert_command(
                        session,
                        installation_id=uuid.UUID(plugin.id),
                        attempt_id=attempt_id,
                        type="update",
                        payload={"version": "1.2.3"},
                        automatic=True,
                        ttl_s=3600,
                        max_deliveries=5,
                    )
                    # Not in flight any more, so the caps never stop the run.
                    await session.execute(
                        text(
                            "UPDATE plugin_autopatch_attempts SET status = 'cancelled'"
                            " WHERE id = :id"
                        ),
                        {"id": attempt_id},
                    )
                    await asyncio.sleep(hold_s)
                queued += 1
    finally:
        await engine.dispose()
    return queued


async def kill_switch_race(
    settings: Settings, db: Any, plugins: list[Plugin], *, rounds: int
) -> tuple[int, int]:
    """`rounds` times: four enqueuers run, the kill switch is flipped from another
    connection, they stop. Returns (commands queued, commands committed after a flip)."""
    db.execute(VIOLATION_PROBE)
    queued = 0
    for _ in range(rounds):
        enable_autopatch(
            db,
            *(p.tenant for p in plugins),
            cooldown_s=0,
            max_concurrent_actions=1000,
            max_concurrent_actions_per_tenant=1000,
        )
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(enqueue_as_fast_as_possible(settings, plugins, stop, hold_s=0.02))
            for _ in range(4)
        ]
        await asyncio.sleep(0.7)
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        await asyncio.to_thread(flip_kill_switch, settings)
        await asyncio.sleep(0.3)
        stop.set()
        queued += sum(await asyncio.gather(*tasks))
    violations = db.execute("SELECT count(*) FROM kill_switch_violations").fetchone()[0]
    return queued, violations


def flip_kill_switch(settings: Settings) -> None:
    """The runbook's statement, typed in psql: the real psql when the machine has it,
    otherwise the same statement on its own autocommit connection, as psql sends it."""
    url = libpq_url(settings.database_url or "")
    statement = "UPDATE ops_policy SET autopatch_enabled = false WHERE id = 1;"
    psql = shutil.which("psql")
    if psql:
        done = subprocess.run(
            [psql, url, "-v", "ON_ERROR_STOP=1", "-c", statement],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0 and "UPDATE 1" in done.stdout, done.stderr
        return
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


async def test_kill_switch_in_psql_no_command_commits_after_the_flip(loop_settings, db):
    plugins = [await register(loop_settings, tenant=f"m-{n}") for n in range(4)]
    queued, violations = await kill_switch_race(loop_settings, db, plugins, rounds=3)
    assert queued > 20, "the enqueuers did not get going"
    assert violations == 0


async def test_control_without_the_policy_lock_the_probe_catches_violations(
    loop_settings, db, monkeypatch
):
    """The same race with the FOR SHARE taken out of the gate's policy read: commands whose
    transaction commits after the flip get through, and the probe sees them. This is what
    makes the test above mean something."""
    original = policy_repo.read_policy_for_share

    async def without_lock(session: Any) -> Any:
        real_execute = session.execute

        async def execute(statement: Any, *args: Any, **kwargs: Any) -> Any:
            sql = str(statement)
            if "FROM ops_policy WHERE id = 1 FOR SHARE" in sql:
                statement = text(sql.replace(" FOR SHARE", ""))
            return await real_execute(statement, *args, **kwargs)

        session.execute = execute
        try:
            return await original(session)
        finally:
            del session.execute

    monkeypatch.setattr(policy_repo, "read_policy_for_share", without_lock)
    plugins = [await register(loop_settings, tenant=f"m-{n}") for n in range(4)]
    queued, violations = await kill_switch_race(loop_settings, db, plugins, rounds=3)
    assert queued > 20
    assert violations > 0
