"""The healing loop run in process, step by step (tests/test_healing.py's harness, shared with
the tests that drive it otherwise): its settings against the reference services, the loop
itself, signed releases, the plugin's side (heartbeats, acks) and what the database says."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.decisions.breaker import CircuitBreaker
from app.decisions.client import DecisionClient
from app.healing.engine import Healer
from app.healing.staging import StagingClient
from app.incidents.detection import detect_once
from app.releases import service as release_service
from app.releases.signing import generate_key, load_signer
from tests.support.api import serve_http
from tests.support.plugins import Plugin, heartbeat_body, send_heartbeat
from tests.support.ports import free_port
from tests.support.services import RUNNER_TOKEN, SIRA_TOKEN, Server
from tests.support.settings import make_settings

_uptime = iter(range(50_000, 10**9, 100))
HEALTHY = {"requests": 1000, "errors": 2, "webhook_attempts": 50, "webhook_failures": 0}
FAILING_WEBHOOKS = {"requests": 1000, "errors": 2, "webhook_attempts": 50, "webhook_failures": 30}


def healing_settings(settings: Settings, sira: Server, runner: Server, tmp_path: Path) -> Settings:
    """The test's database and Redis prefix, the reference services, and a loop quick enough
    for tests."""
    return make_settings(
        settings.database_url or "",
        settings.redis_url or "",
        settings.redis_prefix,
        data_dir=tmp_path,
        sira_api_url=sira.url,
        sira_api_token=SIRA_TOKEN,
        staging_runner_url=runner.url,
        staging_runner_token=RUNNER_TOKEN,
        health_window_s=2,
        heal_poll_s=0.05,
        blocked_recheck_s=0.05,
        recovery_heartbeats=2,
        decision_deadline_s=1.0,
        missed_decide_after_s=0,
        command_lease_s=1,
        # The API listens for real: the staging runner fetches artifacts from it.
        port=free_port(),
    )


@dataclass
class Loop:
    settings: Settings
    healer: Healer
    client: httpx.AsyncClient
    decisions: DecisionClient

    async def turn(self) -> None:
        """One pass: every due incident advanced as far as it can go now."""
        for incident_id in await self.healer.claim_due():
            await self.healer.advance(incident_id)

    async def until(self, db: Any, predicate: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, (
                "the loop did not get there in time; incidents: "
                + repr(db.execute("SELECT status, status_reason FROM plugin_incidents").fetchall())
            )
            await detect_once(self.healer.maker, self.settings)
            await self.turn()
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def healing_loop(settings: Settings) -> AsyncIterator[Loop]:
    engine = create_engine(settings, role="test-worker")
    maker = create_sessionmaker(engine)
    async with httpx.AsyncClient() as http, serve_http(settings) as (_, client):
        decisions = DecisionClient(
            http,
            base_url=settings.sira_api_url,
            token=settings.sira_api_token,
            deadline_s=settings.decision_deadline_s,
            breaker=CircuitBreaker(failure_threshold=2, cool_down_s=0.5),
        )
        staging = StagingClient(
            http,
            base_url=settings.staging_runner_url,
            token=settings.staging_runner_token,
            deadline_s=2.0,
        )
        try:
            yield Loop(settings, Healer(maker, settings, decisions, staging), client, decisions)
        finally:
            await engine.dispose()


async def add_release(settings: Settings, tmp_path: Path, plugin: str, version: str) -> None:
    """Release a real artifact: a simulated plugin (plugin.yaml `simulated: true`), which the
    staging runner fetches, unpacks and checks, then passes without running its code."""
    from sim.artifacts import build_plugin_artifact

    key = settings.data_dir / "keys" / "release-signing.pem"
    if not key.exists():
        generate_key(key)
    artifact = build_plugin_artifact(
        tmp_path / f"{plugin}-{version}.tar.gz", name=plugin, version=version, simulated=True
    )
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            await release_service.add_release(
                session,
                load_signer(key),
                plugin=plugin,
                version=version,
                artifact=artifact,
                valid_days=30,
            )
    finally:
        await engine.dispose()


async def beat(
    loop: Loop, plugin: Plugin, version: str, telemetry: dict[str, int]
) -> list[dict[str, Any]]:
    response = await send_heartbeat(
        loop.client,
        plugin,
        heartbeat_body(plugin_version=version, uptime_s=next(_uptime), telemetry=telemetry),
    )
    assert response.status_code == 200, response.text
    commands: list[dict[str, Any]] = response.json()["commands"]
    return commands


async def healthy_again(loop: Loop, plugin: Plugin, version: str) -> None:
    """The heartbeats that prove a plugin healthy on `version` (after a rollback to it)."""
    for _ in range(loop.settings.recovery_heartbeats):
        await beat(loop, plugin, version, HEALTHY)


async def signed_post(loop: Loop, plugin: Plugin, path: str, payload: Any) -> httpx.Response:
    body = orjson.dumps(payload)
    return await loop.client.post(path, content=body, headers=plugin.headers(body, path))


async def ack(loop: Loop, plugin: Plugin, command: dict[str, Any]) -> None:
    response = await signed_post(
        loop, plugin, f"/api/plugins/commands/{command['id']}/ack", {"result": {"ok": True}}
    )
    assert response.status_code == 200, response.text


def enable_autopatch(db: Any, *tenants: str, **extra: Any) -> None:
    sets = ", ".join(f"{name} = %({name})s" for name in extra)
    db.execute(
        "UPDATE ops_policy SET autopatch_enabled = true, autopatch_whitelist = %(w)s::jsonb"
        + (f", {sets}" if sets else "")
        + " WHERE id = 1",
        {"w": orjson.dumps(list(tenants)).decode(), **extra},
    )


def incident_status(db: Any) -> tuple[str, str | None]:
    row = db.execute(
        "SELECT status, status_reason FROM plugin_incidents WHERE installation_id IS NOT NULL"
        " ORDER BY detected_at DESC LIMIT 1"
    ).fetchone()
    return (row[0], row[1]) if row else ("none", None)


def attempts(db: Any) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT action, from_version, to_version, status, decision_source FROM"
        " plugin_autopatch_attempts ORDER BY created_at"
    ).fetchall()


def commands(db: Any) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT type, payload->>'version', status, automatic FROM plugin_agent_commands"
        " ORDER BY created_at"
    ).fetchall()


def incident_id(db: Any) -> str:
    return str(
        db.execute("SELECT id FROM plugin_incidents WHERE installation_id IS NOT NULL").fetchone()[
            0
        ]
    )
