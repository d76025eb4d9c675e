"""What real plugins need from the control plane (issue 7): signed responses, an adaptive
heartbeat interval, artifacts served to signed requests (and to the staging runner through a
pre-signed URL), a known-good version per installation that rollbacks and regressions go back
to, rollbacks without a signed release, an early rollback when the new version is proven sick,
no proposal of a version that already failed on an installation, and quiet idle workers.

The healing loop runs in this process (tests/support/healing.py, the harness of
tests/test_healing.py) against the real reference services; tests/test_e2e_default_settings.py
drives the same with real processes, a real plugin_client and every setting at its default."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.healing.repository import load_state
from app.incidents.detection import detect_once
from app.plugins.service import rotate_secret
from app.releases.artifacts import ArtifactCapabilities
from tests.support.api import serve
from tests.support.healing import (
    FAILING_WEBHOOKS,
    HEALTHY,
    Loop,
    ack,
    add_release,
    attempts,
    beat,
    commands,
    enable_autopatch,
    healing_loop,
    healthy_again,
    incident_id,
    incident_status,
)
from tests.support.plugins import Plugin, heartbeat_body, register, send_heartbeat
from tests.support.ports import free_port
from tests.support.settings import REPO, settings_env

pytestmark = pytest.mark.timeout(120)
SELFHEAL = [sys.executable, "-m", "app.cli"]

ARTIFACT = "/api/plugins/releases/{plugin}/{version}/artifact"


def response_signature_ok(secret: str, response: httpx.Response, path: str) -> bool:
    stamp = response.headers["x-timestamp"]
    message = f"{stamp}.{response.status_code}.{path}.".encode() + response.content
    expected = "v1=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, response.headers["x-signature"]) and (
        abs(int(stamp) - time.time()) < 60
    )


def known_good(db: Any, plugin: Plugin) -> tuple[str | None, bool]:
    row = db.execute(
        "SELECT known_good_version, good_since IS NOT NULL FROM merchant_plugins WHERE id = %s",
        (plugin.id,),
    ).fetchone()
    return row[0], row[1]


def backdate_streak(db: Any, plugin: Plugin, seconds: int) -> None:
    """As if the current healthy streak had begun `seconds` ago (no test waits out a window)."""
    db.execute(
        "UPDATE merchant_plugins SET good_since = good_since - make_interval(secs => %s)"
        " WHERE id = %s",
        (seconds, plugin.id),
    )


# --- signed responses and the adaptive interval ---------------------------------------------


async def test_heartbeat_response_is_signed_with_the_secret_the_request_used(
    settings, plugin, client
):
    response = await send_heartbeat(client, plugin)
    assert response.status_code == 200
    assert response_signature_ok(plugin.secret, response, "/api/plugins/heartbeat")
    assert not response_signature_ok("another-secret", response, "/api/plugins/heartbeat")
    # During a rotation both secrets work, and each request is answered with its own.
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            issued = await rotate_secret(
                session, SecretBox(settings.secret_key), uuid.UUID(plugin.id), grace_s=600
            )
    finally:
        await engine.dispose()
    old = await send_heartbeat(client, plugin)
    new = await send_heartbeat(client, plugin, secret=issued.secret)
    assert old.status_code == new.status_code == 200
    assert response_signature_ok(plugin.secret, old, "/api/plugins/heartbeat")
    assert response_signature_ok(issued.secret, new, "/api/plugins/heartbeat")
    assert not response_signature_ok(plugin.secret, new, "/api/plugins/heartbeat")


async def test_next_heartbeat_s_is_short_while_something_is_going_on(settings, plugin, client, db):
    fast, interval = settings.heartbeat_fast_s, settings.heartbeat_interval_s
    assert (fast, interval) == (5, 120)  # the defaults

    async def next_s(telemetry: dict[str, int] | None = None) -> int:
        body = (
            heartbeat_body(uptime_s=int(time.monotonic() * 1000), telemetry=telemetry)
            if telemetry
            else None
        )
        response = await send_heartbeat(client, plugin, body)
        assert response.status_code == 200, response.text
        value: int = response.json()["next_heartbeat_s"]
        return value

    assert await next_s() == interval
    # A heartbeat that crosses a threshold: detection will open an incident on it.
    assert await next_s(FAILING_WEBHOOKS) == fast
    assert await next_s({"requests": 100, "errors": 40}) == fast
    assert await next_s(HEALTHY) == interval
    # An open incident.
    assert await next_s(FAILING_WEBHOOKS) == fast
    engine = create_engine(settings, role="test")
    try:
        await detect_once(create_sessionmaker(engine), settings)
    finally:
        await engine.dispose()
    assert db.execute("SELECT count(*) FROM plugin_incidents").fetchone() == (1,)
    assert await next_s(HEALTHY) == fast
    db.execute("UPDATE plugin_incidents SET status = 'resolved'")
    assert await next_s(HEALTHY) == interval
    # A command waiting for the plugin.
    db.execute(
        "INSERT INTO plugin_agent_commands (installation_id, type, payload, expires_at)"
        " VALUES (%s, 'config', '{\"values\": {}}', now() + interval '1 hour')",
        (plugin.id,),
    )
    assert await next_s(HEALTHY) == fast  # this response hands it out
    assert await next_s(HEALTHY) == fast  # delivered, not yet acknowledged
    db.execute("UPDATE plugin_agent_commands SET status = 'acked'")
    assert await next_s(HEALTHY) == interval
    # A restart (uptime went down): a crash loop shows in a few short intervals.
    restarted = await send_heartbeat(client, plugin, heartbeat_body(uptime_s=3, telemetry=HEALTHY))
    assert restarted.json()["next_heartbeat_s"] == fast
    # Few requests with an error say nothing: 1 in 17 is not an error spike.
    assert await next_s({"requests": 17, "errors": 1}) == interval


# --- artifacts --------------------------------------------------------------------------------


@pytest.fixture
def release_settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(update={"data_dir": tmp_path})


async def test_artifacts_are_served_to_signed_requests_of_that_plugin_only(
    release_settings, tmp_path, db
):
    settings = release_settings
    payments = await register(settings, name="payments")
    shipping = await register(settings, tenant="merchant-2", name="shipping")
    await add_release(settings, tmp_path, "payments", "1.2.3")
    content, sha256 = db.execute(
        "SELECT content, sha256 FROM plugin_release_artifacts WHERE version = '1.2.3'"
    ).fetchone()
    path = ARTIFACT.format(plugin="payments", version="1.2.3")
    async with serve(settings) as (_, client):
        ok = await client.get(path, headers=payments.headers(b"", path, method="GET"))
        assert ok.status_code == 200
        assert ok.content == bytes(content)
        assert hashlib.sha256(ok.content).hexdigest() == sha256 == ok.headers["x-artifact-sha256"]
        # Another plugin's installation: as if there were no such release.
        other = await client.get(path, headers=shipping.headers(b"", path, method="GET"))
        assert other.status_code == 404
        unsigned = await client.get(path)
        assert unsigned.status_code == 401
        forged = await client.get(
            path, headers=payments.headers(b"", path, method="GET", secret="not-the-secret")
        )
        assert forged.status_code == 401
        missing = ARTIFACT.format(plugin="payments", version="9.9.9")
        gone = await client.get(missing, headers=payments.headers(b"", missing, method="GET"))
        assert gone.status_code == 404
        # The staging runner's pre-signed URL opens this artifact, and only until it expires.
        capabilities = ArtifactCapabilities(settings.secret_key)
        url = urlsplit(capabilities.url("http://x", "payments", "1.2.3", ttl_s=60))
        presigned = await client.get(f"{url.path}?{url.query}")
        assert presigned.status_code == 200 and presigned.content == bytes(content)
        flipped = "1" if url.query[-1] == "0" else "0"
        tampered = await client.get(f"{url.path}?{url.query[:-1]}{flipped}")
        expired_url = urlsplit(capabilities.url("http://x", "payments", "1.2.3", ttl_s=-1))
        expired = await client.get(f"{expired_url.path}?{expired_url.query}")
        other_path = ARTIFACT.format(plugin="payments", version="1.2.2")
        elsewhere = await client.get(f"{other_path}?{url.query}")
        assert [tampered.status_code, expired.status_code, elsewhere.status_code] == [403] * 3


async def test_register_with_artifact_records_and_signs_the_installed_version(
    release_settings, tmp_path, db
):
    from app.releases.signing import generate_key
    from sim.artifacts import build_plugin_artifact

    generate_key(release_settings.data_dir / "keys" / "release-signing.pem")
    artifact = build_plugin_artifact(tmp_path / "crm.tar.gz", name="erp_crm", version="2.0.1")
    env = settings_env(release_settings) | {"SELFHEAL_DATA_DIR": str(release_settings.data_dir)}

    def register_with(path: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                *SELFHEAL,
                *("plugin register --tenant merchant-9 --name erp_crm".split()),
                *("--version 2.0.1 --artifact".split()),
                str(path),
                *extra,
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )

    run = register_with(artifact, "--json")
    assert run.returncode == 0, run.stderr.decode()
    out = orjson.loads(run.stdout)
    assert out["release"] == "added"
    assert out["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert db.execute(
        "SELECT r.artifact_url, a.size_bytes FROM plugin_releases r"
        " JOIN plugin_release_artifacts a USING (plugin_name, version)"
        " WHERE r.plugin_name = 'erp_crm' AND r.version = '2.0.1'"
    ).fetchone() == ("/api/plugins/releases/erp_crm/2.0.1/artifact", artifact.stat().st_size)
    # A different artifact under the same version registers nothing.
    other = build_plugin_artifact(
        tmp_path / "other.tar.gz", name="erp_crm", version="2.0.1", source="X = 1\n"
    )
    refused = register_with(other)
    assert refused.returncode == 1
    assert b"already released with sha256" in refused.stderr
    assert db.execute("SELECT count(*) FROM merchant_plugins").fetchone() == (1,)


# --- the known-good version -------------------------------------------------------------------


async def test_a_version_healthy_for_a_whole_window_becomes_known_good(
    loop_settings, plugin, db, sira, runner
):
    window = loop_settings.health_window_s
    async with healing_loop(loop_settings) as loop:
        assert known_good(db, plugin) == (None, True)  # the streak starts at registration
        await beat(loop, plugin, "1.2.2", HEALTHY)
        await detect_once(loop.healer.maker, loop.settings)
        assert known_good(db, plugin)[0] is None  # not a whole window yet
        # A streak as long as the window, but no heartbeat since the window ended: not proven.
        db.execute(
            "UPDATE merchant_plugins SET good_since = now() - make_interval(secs => %s),"
            " last_heartbeat_at = now() - make_interval(secs => %s) WHERE id = %s",
            (window + 10, 20, plugin.id),
        )
        await detect_once(loop.healer.maker, loop.settings)
        assert known_good(db, plugin)[0] is None
        await beat(loop, plugin, "1.2.2", HEALTHY)
        await detect_once(loop.healer.maker, loop.settings)
        assert known_good(db, plugin) == ("1.2.2", True)
        # A new version starts a new streak; an incident ends it; its closing restarts it.
        await beat(loop, plugin, "1.3.0", HEALTHY)
        assert known_good(db, plugin) == ("1.2.2", True)
        await beat(loop, plugin, "1.3.0", FAILING_WEBHOOKS)
        await detect_once(loop.healer.maker, loop.settings)
        assert known_good(db, plugin) == ("1.2.2", False)
        db.execute("UPDATE plugin_incidents SET status = 'resolved'")
        assert known_good(db, plugin) == ("1.2.2", True)
        backdate_streak(db, plugin, window + 1)
        await beat(loop, plugin, "1.3.0", HEALTHY)
        await detect_once(loop.healer.maker, loop.settings)
        assert known_good(db, plugin) == ("1.3.0", True)


async def prove_known_good(loop: Loop, plugin: Plugin, db: Any, version: str) -> None:
    await beat(loop, plugin, version, HEALTHY)
    backdate_streak(db, plugin, loop.settings.health_window_s + 1)
    await beat(loop, plugin, version, HEALTHY)
    await detect_once(loop.healer.maker, loop.settings)
    assert known_good(db, plugin)[0] == version


async def test_a_patch_that_does_not_heal_goes_back_to_the_known_good_version_without_a_release(
    loop_settings, plugin, db, sira, runner, tmp_path
):
    # 1.2.2 is known good but was never released; the operator deployed 1.3.0 (bad); the
    # decision service patches forward to 1.3.1, which does not fix it either.
    for version in ("1.3.0", "1.3.1"):
        await add_release(loop_settings, tmp_path, plugin.name, version)
    sira.control(regression_strategy="forward")
    enable_autopatch(
        db, plugin.tenant, approval_min_severity="critical", autopatch_max_severity="high"
    )
    async with healing_loop(loop_settings) as loop:
        await prove_known_good(loop, plugin, db, "1.2.2")
        await beat(loop, plugin, "1.3.0", FAILING_WEBHOOKS)
        await detect_once(loop.healer.maker, loop.settings)
        snapshot = db.execute(
            "SELECT type, telemetry_snapshot->'evidence'->>'previous_version' FROM plugin_incidents"
        ).fetchone()
        assert snapshot == ("regression", "1.2.2")  # the incident names the known-good version
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        got = await beat(loop, plugin, "1.3.0", FAILING_WEBHOOKS)
        assert [(c["type"], c["payload"]["version"]) for c in got] == [("update", "1.3.1")]
        await ack(loop, plugin, got[0])
        await loop.until(db, lambda: incident_status(db)[0] == "verifying")
        # Sick on 1.3.1 too: the first heartbeat after the change carries the traffic of
        # before it, so it takes that one and `recovery_heartbeats` more to prove it.
        for _ in range(loop.settings.recovery_heartbeats + 1):
            await beat(loop, plugin, "1.3.1", FAILING_WEBHOOKS)
        await loop.until(db, lambda: incident_status(db)[0] == "rolling_back", timeout=5)
        got = await beat(loop, plugin, "1.3.1", FAILING_WEBHOOKS)
        assert [(c["type"], c["payload"]) for c in got] == [("rollback", {"version": "1.2.2"})]
        await ack(loop, plugin, got[0])
        await loop.turn()
        assert incident_status(db)[0] == "rolling_back"  # until proven healthy on 1.2.2
        await healthy_again(loop, plugin, "1.2.2")
        await loop.until(db, lambda: incident_status(db)[0] == "rolled_back")
        reason = incident_status(db)[1]
        assert reason is not None and reason.startswith("rolled back to 1.2.2")
        assert attempts(db) == [("patch", "1.3.0", "1.3.1", "rolled_back", "sira")]
        # Back on 1.2.2 (previous_version is now 1.3.1): what a later regression would go
        # back to is still nothing that failed here.
        await beat(loop, plugin, "1.2.2", HEALTHY)
        async with loop.healer.maker() as session:
            state = await load_state(session, uuid.UUID(incident_id(db)))
        assert state is not None and state.current_version == "1.2.2"
        assert state.previous_version is None
        assert db.execute(
            "SELECT previous_version FROM merchant_plugins WHERE id = %s", (plugin.id,)
        ).fetchone() == ("1.3.1",)


async def test_a_proven_sick_update_is_rolled_back_before_the_window_ends(
    loop_settings, plugin, db, sira, runner, tmp_path
):
    settings = loop_settings.model_copy(update={"health_window_s": 3600})
    for version in ("1.2.2", "1.2.3"):
        await add_release(settings, tmp_path, plugin.name, version)
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(settings) as loop:
        await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        await detect_once(loop.healer.maker, settings)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        got = await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        await ack(loop, plugin, got[0])
        await loop.until(db, lambda: incident_status(db)[0] == "verifying")
        for _ in range(settings.recovery_heartbeats):
            await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        await loop.turn()
        # Two sick heartbeats, the first of them carrying the traffic of before: not proven.
        assert incident_status(db)[0] == "verifying"
        await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        await loop.until(db, lambda: incident_status(db)[0] == "rolling_back", timeout=5)
    assert commands(db) == [
        ("update", "1.2.3", "acked", True),
        ("rollback", "1.2.2", "pending", True),
    ]


async def patch_that_does_not_heal(loop: Loop, plugin: Plugin, db: Any) -> None:
    """1.2.2 fails its webhooks, is patched to 1.2.3, which fails them too: rolling back."""
    await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
    await detect_once(loop.healer.maker, loop.settings)
    await loop.until(db, lambda: incident_status(db)[0] == "applying")
    await ack(loop, plugin, (await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS))[0])
    for _ in range(loop.settings.recovery_heartbeats + 1):
        await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
    await loop.until(db, lambda: incident_status(db)[0] == "rolling_back")


async def test_a_version_that_failed_on_an_installation_is_not_proposed_to_it_again(
    loop_settings, plugin, db, sira, runner, tmp_path
):
    for version in ("1.2.2", "1.2.3"):
        await add_release(loop_settings, tmp_path, plugin.name, version)
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await patch_that_does_not_heal(loop, plugin, db)
        got = await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        await ack(loop, plugin, got[0])
        await healthy_again(loop, plugin, "1.2.2")
        await loop.until(db, lambda: incident_status(db)[0] == "rolled_back")
        # Sick on 1.2.2 again later: a new incident, and 1.2.3 is not offered again.
        await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        await loop.until(
            db,
            lambda: (
                db.execute(
                    "SELECT count(*) FROM plugin_incidents WHERE status = 'escalated'"
                ).fetchone()
                == (1,)
            ),
        )
    assert [a[2:4] for a in attempts(db)] == [("1.2.3", "rolled_back")]
    decision = db.execute(
        "SELECT sira_decision->>'action' FROM plugin_incidents WHERE status = 'escalated'"
    ).fetchone()
    assert decision == ("escalate",)


async def test_a_bad_release_rolled_back_from_often_enough_is_quarantined(
    loop_settings, db, sira, runner, tmp_path
):
    settings = loop_settings.model_copy(update={"quarantine_after_rollbacks": 2})
    plugins = [await register(settings, tenant=f"merchant-{n}") for n in range(2)]
    await add_release(settings, tmp_path, "payments", "1.4.0")
    enable_autopatch(
        db,
        *(p.tenant for p in plugins),
        approval_min_severity="critical",
        autopatch_max_severity="high",
    )
    async with healing_loop(settings) as loop:
        for plugin in plugins:
            await prove_known_good(loop, plugin, db, "1.2.2")
            await beat(loop, plugin, "1.4.0", FAILING_WEBHOOKS)  # deployed outside selfheal
        await detect_once(loop.healer.maker, settings)

        async def roll_back_each() -> None:
            for plugin in plugins:
                got = await beat(loop, plugin, "1.4.0", FAILING_WEBHOOKS)
                for command in got:
                    assert command["payload"] == {"version": "1.2.2"}
                    await ack(loop, plugin, command)
                if not got and incident_of(db, plugin) == "verifying":
                    for _ in range(settings.recovery_heartbeats):
                        await beat(loop, plugin, "1.2.2", HEALTHY)

        def done() -> bool:
            return db.execute(
                "SELECT count(*) FROM plugin_incidents WHERE status = 'resolved'"
            ).fetchone() == (2,)

        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, db.execute(
                "SELECT status, status_reason FROM plugin_incidents"
            ).fetchall()
            await roll_back_each()
            await loop.turn()
            await asyncio.sleep(0.05)
    assert db.execute(
        "SELECT quarantined_at IS NOT NULL, quarantine_reason FROM plugin_releases"
        " WHERE version = '1.4.0'"
    ).fetchall() == [
        (
            True,
            "rolled back 2 times across the fleet, on the installations of 2 tenants"
            " (thresholds: 2 rollbacks, 2 tenants)",
        )
    ]
    assert [a[0:4] for a in attempts(db)] == [("rollback", "1.4.0", "1.2.2", "success")] * 2


def incident_of(db: Any, plugin: Plugin) -> str:
    row = db.execute(
        "SELECT status FROM plugin_incidents WHERE installation_id = %s"
        " ORDER BY detected_at DESC LIMIT 1",
        (plugin.id,),
    ).fetchone()
    return row[0] if row else "none"


# --- an idle worker says nothing -------------------------------------------------------------


def test_an_idle_worker_logs_nothing_at_info_level(settings, db):
    port = free_port()
    env = settings_env(settings) | {
        "LOG_LEVEL": "info",
        "SELFHEAL_DETECT_EVERY_S": "0.2",
        "SELFHEAL_WORKER_METRICS_PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker"],
        env=env,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        # Wait until the worker reports 40 finished tick jobs (about ten ticks of four jobs) in
        # its own metrics (workers/metrics.py), not for a clock.
        deadline = time.monotonic() + 90
        while completed_ticks(port) < 40:
            assert proc.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the worker ran no ticks"
            time.sleep(0.2)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    events = [orjson.loads(line).get("event", "") for line in err.splitlines() if line.strip()]
    # Start and stop lines only: no line per tick job (arq's "0.01s → detect:…()" lines).
    assert [e for e in events if "→" in e or "←" in e] == [], events
    assert len(events) <= 8, events


def completed_ticks(port: int) -> float:
    """The tick jobs the worker has run, from its /metrics (0 until it serves them)."""
    try:
        page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return 0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("selfheal_worker_jobs_total{") and 'lane="ticks"' in line
    )


async def test_a_rollback_that_does_not_heal_escalates_as_critical(
    loop_settings, plugin, db, sira, runner, tmp_path
):
    for version in ("1.2.2", "1.2.3"):
        await add_release(loop_settings, tmp_path, plugin.name, version)
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await patch_that_does_not_heal(loop, plugin, db)
        await ack(loop, plugin, (await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS))[0])
        for _ in range(loop.settings.recovery_heartbeats + 1):
            await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
    assert incident_status(db)[1] == (
        "rolled back to 1.2.2, but webhook_fail_rate is still present there"
    )
    assert db.execute("SELECT severity FROM plugin_incidents").fetchone() == ("critical",)
    assert [a[3] for a in attempts(db)] == ["rolled_back"]


async def test_a_fallback_decision_blocked_by_the_gate_is_asked_again_when_the_service_is_back(
    loop_settings, plugin, db, sira, runner
):
    # A bad deploy while the decision service is down: the fallback rolls back (confidence
    # 0.9), which this policy's minimum (0.95) blocks.
    enable_autopatch(
        db,
        plugin.tenant,
        autopatch_max_severity="high",
        approval_min_severity="critical",
        min_confidence=0.95,
    )
    sira.control(mode="error")
    async with healing_loop(loop_settings) as loop:
        await prove_known_good(loop, plugin, db, "1.2.2")
        await beat(loop, plugin, "1.3.0", FAILING_WEBHOOKS)
        await detect_once(loop.healer.maker, loop.settings)
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
        assert decision_source(db) == "fallback"
        # The service answers again: the blocked incident is decided again, by it.
        sira.control(mode="normal")
        await loop.until(db, lambda: decision_source(db) == "sira", timeout=30)
    assert incident_status(db)[0] == "blocked_by_policy"  # 0.9 < 0.95 either way


def decision_source(db: Any) -> str | None:
    row = db.execute("SELECT sira_decision->>'source' FROM plugin_incidents").fetchone()
    return row[0] if row else None
