"""The healing loop end to end, one flow of the brief per test: real PostgreSQL and Redis, the
reference decision service and staging runner as real processes on loopback, the API in
process, and the test playing the plugin (signed heartbeats, reading commands from the
responses, acking or failing them). The loop runs in process (Healer.claim_due / advance)
so each test can drive it step by step; tests/test_healing_workers.py runs it in real
`selfheal worker` processes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.incidents.detection import detect_once
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
    signed_post,
)
from tests.support.personas import Persona
from tests.support.plugins import Plugin, register

pytestmark = pytest.mark.timeout(120)


async def sick_plugin(loop: Loop, plugin: Plugin, db: Any) -> None:
    """The brief's example: a webhook failure rate of 0.6 on 1.2.2 -> a medium incident."""
    await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
    await detect_once(loop.healer.maker, loop.settings)
    assert incident_status(db)[0] == "detected"


@pytest.fixture
async def releases(loop_settings: Settings, tmp_path: Path, plugin: Plugin) -> None:
    for version in ("1.2.2", "1.2.3"):
        await add_release(loop_settings, tmp_path, plugin.name, version)


# --- the brief's flows ---------------------------------------------------------------------


async def test_autopatch_success_end_to_end(
    loop_settings, plugin, db, releases, sira, runner, viewer
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        got = await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        assert [(c["type"], c["payload"]["version"]) for c in got] == [("update", "1.2.3")]
        payload = got[0]["payload"]
        assert set(payload) == {"version", "artifact_url", "sha256", "signature", "signed"}
        await ack(loop, plugin, got[0])
        await loop.until(db, lambda: incident_status(db)[0] == "verifying")
        for _ in range(2):
            await beat(loop, plugin, "1.2.3", HEALTHY)
        await loop.until(db, lambda: incident_status(db)[0] == "resolved")
        # What ops see afterwards: why, and each step, in order.
        detail = (
            await loop.client.get(
                f"/api/ops/plugin-incidents/{incident_id(db)}", headers=viewer.auth
            )
        ).json()
    events = [item["event"] for item in detail["timeline"]]
    assert events[1] == "detected (webhook_fail_rate)"
    assert events[2] == "decided (sira): patch 1.2.3, confidence 0.87"
    assert [e.split(": ", 1)[1] for e in events if e.startswith("attempt ")] == [
        "created -> pending",
        "pending -> staging",
        "staging -> staging",
        "staging -> applying",
        "applying -> verifying",
        "verifying -> success",
    ]
    assert events[-1] == "resolved: patch to 1.2.3 verified healthy"
    assert detail["sira_decision"]["explanation"]
    assert attempts(db) == [("patch", "1.2.2", "1.2.3", "success", "sira")]
    assert commands(db) == [("update", "1.2.3", "acked", True)]
    row = db.execute(
        "SELECT executed_at IS NOT NULL, finished_at IS NOT NULL FROM plugin_autopatch_attempts"
    ).fetchone()
    assert row == (True, True)
    feedback = db.execute(
        "SELECT incident_type, from_version, to_version, decision_source, outcome, tenant_id"
        " FROM sira_learning_feedback"
    ).fetchall()
    assert feedback == [("webhook_fail_rate", "1.2.2", "1.2.3", "sira", "success", plugin.tenant)]
    # Every step is in the hash-chained event log, and the chain verifies.
    statuses = [
        r[0]
        for r in db.execute(
            "SELECT new_status FROM plugin_autopatch_attempt_events ORDER BY id"
        ).fetchall()
    ]
    assert statuses[0] == "pending" and statuses[-1] == "success"
    assert {"staging", "applying", "verifying"} <= set(statuses)
    assert db.execute("SELECT selfheal_verify_attempt_events()").fetchone() == (None,)


async def test_staging_failure_fails_the_attempt_and_sends_no_command(
    loop_settings, plugin, db, releases, sira, runner
):
    runner.control(fail_versions=["1.2.3"])
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
    assert attempts(db) == [("patch", "1.2.2", "1.2.3", "failed", "sira")]
    assert commands(db) == []
    reason = db.execute("SELECT failure_reason FROM plugin_autopatch_attempts").fetchone()[0]
    assert "staging failed" in reason and "nothing was changed in production" in reason


async def test_unreachable_staging_runner_fails_safe_after_bounded_tries(
    loop_settings, plugin, db, releases, sira, runner
):
    runner.control(mode="error")
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "escalated", timeout=30)
    assert attempts(db)[0][3] == "failed" and commands(db) == []
    row = db.execute(
        "SELECT staging_tries, failure_reason FROM plugin_autopatch_attempts"
    ).fetchone()
    assert row[0] == loop_settings.staging_max_tries - 1 and "unusable" in row[1]


async def test_health_failure_rolls_back_automatically(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        update = await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        await ack(loop, plugin, update[0])
        await loop.until(db, lambda: incident_status(db)[0] == "verifying")
        # 1.2.3 is no better: the health window passes with the anomaly still there.
        await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        await loop.until(db, lambda: incident_status(db)[0] == "rolling_back")
        rollback = await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        assert [(c["type"], c["payload"]["version"]) for c in rollback] == [("rollback", "1.2.2")]
        await ack(loop, plugin, rollback[0])
        # The rollback counts once the plugin is proven healthy on 1.2.2 again.
        await healthy_again(loop, plugin, "1.2.2")
        await loop.until(db, lambda: incident_status(db)[0] == "rolled_back")
    assert attempts(db) == [("patch", "1.2.2", "1.2.3", "rolled_back", "sira")]
    row = db.execute(
        "SELECT rollback_reason, rolled_back_at IS NOT NULL FROM plugin_autopatch_attempts"
    ).fetchone()
    assert "still present on 1.2.3" in row[0] and row[1]
    assert db.execute("SELECT outcome FROM sira_learning_feedback").fetchall() == [("rolled_back",)]


async def test_failed_rollback_escalates_as_critical(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        await ack(loop, plugin, (await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS))[0])
        await loop.until(db, lambda: incident_status(db)[0] == "rolling_back", timeout=30)
        rollback = await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        response = await signed_post(
            loop,
            plugin,
            f"/api/plugins/commands/{rollback[0]['id']}/fail",
            {"error": "disk full", "retryable": False},
        )
        assert response.status_code == 200, response.text
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
    row = db.execute("SELECT severity, status_reason FROM plugin_incidents").fetchone()
    assert row[0] == "critical" and "rollback to 1.2.2 failed: disk full" in row[1]
    assert attempts(db)[0][3] == "failed"


# --- policy --------------------------------------------------------------------------------


async def test_kill_switch_off_by_default_blocks_with_the_reason(
    loop_settings, plugin, db, releases, sira, runner
):
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
        _, reason = incident_status(db)
        assert "kill switch" in (reason or "") and "whitelist" in (reason or "")
        # The decision is recorded even though nothing may be done.
        decision = db.execute("SELECT sira_decision FROM plugin_incidents").fetchone()[0]
        assert decision["action"] == "patch" and decision["source"] == "sira"
        assert attempts(db) == []
        # Ops turn it on for this tenant: the waiting incident goes ahead by itself.
        enable_autopatch(db, plugin.tenant)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        ({"autopatch_max_severity": "low"}, "above the autopatch cap"),
        ({"min_confidence": 0.95}, "below the minimum"),
        ({"canary_percent": 0}, "outside the canary share"),
    ],
)
async def test_policy_rules_block_automatic_patches(
    loop_settings, plugin, db, releases, sira, runner, policy, reason
):
    enable_autopatch(db, plugin.tenant, **policy)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
    assert reason in (incident_status(db)[1] or "")
    assert attempts(db) == [] and commands(db) == []


async def test_tenant_outside_the_whitelist_is_not_patched(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, "some-other-tenant")
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
    assert "not in the autopatch whitelist" in (incident_status(db)[1] or "")


async def test_kill_switch_between_staging_and_apply_cancels_the_attempt(
    loop_settings, plugin, db, releases, sira, runner
):
    runner.control(delay_s=0.5)
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: bool(attempts(db)) and attempts(db)[0][3] == "staging")
        db.execute("UPDATE ops_policy SET autopatch_enabled = false WHERE id = 1;")
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
    assert attempts(db)[0][3] == "cancelled"
    assert commands(db) == []


async def test_kill_switch_holds_a_queued_command_and_cancels_its_attempt(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        db.execute("UPDATE ops_policy SET autopatch_enabled = false WHERE id = 1;")
        # Not handed to the plugin after the switch...
        assert await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS) == []
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
    # ...and the attempt, never applied, ends cancelled with its command.
    assert attempts(db)[0][3] == "cancelled"
    assert commands(db) == [("update", "1.2.3", "cancelled", True)]


# --- approvals and manual actions ----------------------------------------------------------


async def pending_key(loop: Loop, incident_id: str, persona: Persona) -> str | None:
    """The key of the action the incident waits to take, as its detail shows it."""
    detail = await loop.client.get(f"/api/ops/plugin-incidents/{incident_id}", headers=persona.auth)
    key: str | None = detail.json()["pending_action_key"]
    return key


async def approve(loop: Loop, incident_id: str, persona: Persona) -> httpx.Response:
    """A vote for the action the incident waits to take, as ops give it: after reading its
    detail, naming the key shown there."""
    return await loop.client.post(
        f"/api/ops/plugin-incidents/{incident_id}/approve",
        json={
            "comment": "looks right",
            "action_key": await pending_key(loop, incident_id, persona),
        },
        headers=persona.auth,
    )


async def test_high_severity_needs_a_quorum_of_distinct_operators(
    loop_settings, plugin, db, releases, sira, runner, operator, admin, viewer
):
    enable_autopatch(db, plugin.tenant, approval_min_severity="medium")
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        assert "needs 2 approvals" in (incident_status(db)[1] or "")
        key = incident_id(db)
        # A viewer cannot vote; one vote is not a quorum; the same user twice is one vote.
        assert (await approve(loop, key, viewer)).status_code == 403
        first = await approve(loop, key, operator)
        assert first.status_code == 200, first.text
        assert (await approve(loop, key, operator)).json()["approvals"] == 1
        await loop.turn()
        assert incident_status(db)[0] == "awaiting_approval"
        second = await approve(loop, key, admin)
        assert second.json()["approvals"] == 2
        await loop.until(db, lambda: incident_status(db)[0] == "applying")


async def test_an_approval_names_the_action_its_voter_saw(
    loop_settings, plugin, db, releases, sira, runner, operator, admin
):
    enable_autopatch(db, plugin.tenant, approval_min_severity="medium")
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        key = incident_id(db)
        detail = await loop.client.get(f"/api/ops/plugin-incidents/{key}", headers=operator.auth)
        seen = detail.json()["pending_action_key"]
        first = await loop.client.post(
            f"/api/ops/plugin-incidents/{key}/approve",
            json={"action_key": seen},
            headers=operator.auth,
        )
        assert (first.status_code, first.json()["action_key"]) == (200, seen), first.text
        # The action changes (another target version) before the second operator votes for
        # what they saw: their vote is refused, and names why.
        db.execute(
            "UPDATE plugin_incidents SET pending_action ="
            " jsonb_set(pending_action, '{to_version}', '\"1.2.4\"') WHERE id = %s",
            (key,),
        )
        stale = await loop.client.post(
            f"/api/ops/plugin-incidents/{key}/approve",
            json={"action_key": seen},
            headers=admin.auth,
        )
        assert stale.status_code == 409, stale.text
        assert stale.json()["error"]["field"] == "action_key"
        assert "changed since you saw it" in stale.json()["error"]["message"]
        assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 1


async def test_a_vote_counts_only_for_the_action_it_names(
    loop_settings, plugin, db, releases, tmp_path, sira, runner, operator, admin
):
    """A vote names the action its voter saw; one that names none is refused (it would count
    for whatever the incident waits for when it lands), and a vote for the decided patch to
    1.2.4 does not count once the incident waits for a patch to 1.2.3 instead."""
    await add_release(loop_settings, tmp_path, plugin.name, "1.2.4")
    enable_autopatch(db, plugin.tenant, approval_min_severity="medium", approvals_required=1)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        key = incident_id(db)
        url = f"/api/ops/plugin-incidents/{key}/approve"
        blind = await loop.client.post(url, json={"comment": "ok"}, headers=operator.auth)
        assert blind.status_code == 422, blind.text
        assert blind.json()["error"]["field"] == "action_key"
        assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 0
        seen = await pending_key(loop, key, operator)
        voted = await loop.client.post(url, json={"action_key": seen}, headers=operator.auth)
        assert voted.status_code == 200, voted.text
        assert voted.json()["action"]["to_version"] == "1.2.4"  # the newest release
        # Before the loop takes it, another operator asks for 1.2.3 instead.
        asked = await loop.client.post(
            f"/api/ops/plugin-incidents/{key}/manual-action",
            json={"action": "patch", "patch_version": "1.2.3"},
            headers=admin.auth,
        )
        assert asked.status_code == 200, asked.text
        await loop.turn()
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        await loop.turn()
        assert incident_status(db)[0] == "awaiting_approval"
        assert "has 0" in (incident_status(db)[1] or "")
        assert attempts(db) == []
        detail = (
            await loop.client.get(f"/api/ops/plugin-incidents/{key}", headers=operator.auth)
        ).json()
        assert detail["pending_action"]["to_version"] == "1.2.3"
        assert [v["action_key"] for v in detail["approvals"]] == [seen]
        assert detail["pending_action_key"] != seen


async def test_a_vote_does_not_carry_over_to_a_retry_after_a_failed_attempt(
    loop_settings, plugin, db, releases, sira, runner, operator, admin
):
    runner.control(fail_versions=["1.2.3"])
    enable_autopatch(db, plugin.tenant, approval_min_severity="medium", approvals_required=1)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        key = incident_id(db)
        first = await pending_key(loop, key, operator)
        assert (await approve(loop, key, operator)).status_code == 200
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
        assert attempts(db) == [("patch", "1.2.2", "1.2.3", "failed", "sira")]
        # Another operator tries the very same change again: the first vote authorised the
        # attempt that failed, not this one.
        again = await loop.client.post(
            f"/api/ops/plugin-incidents/{key}/manual-action",
            json={"action": "patch", "patch_version": "1.2.3", "comment": "once more"},
            headers=admin.auth,
        )
        assert again.status_code == 200, again.text
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        await loop.turn()
        assert incident_status(db)[0] == "awaiting_approval"
        assert len(attempts(db)) == 1
        retry = await pending_key(loop, key, operator)
        assert retry is not None and retry != first
        stale = await loop.client.post(
            f"/api/ops/plugin-incidents/{key}/approve",
            json={"action_key": first},
            headers=operator.auth,
        )
        assert stale.status_code == 409, stale.text
        assert "after 1 attempt(s) that ended" in stale.json()["error"]["message"]
        # A vote for the retry itself lets it go.
        assert (await approve(loop, key, operator)).status_code == 200
        await loop.until(db, lambda: len(attempts(db)) == 2)
    assert attempts(db)[1][:3] == ("patch", "1.2.2", "1.2.3")


async def test_expired_approval_does_not_count(
    loop_settings, plugin, db, releases, sira, runner, operator, admin
):
    enable_autopatch(db, plugin.tenant, approval_min_severity="medium", approvals_required=1)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        assert (await approve(loop, incident_id(db), operator)).status_code == 200
        db.execute("UPDATE approvals SET expires_at = now() - interval '1 second'")
        await loop.turn()
        await loop.turn()
        assert incident_status(db)[0] == "awaiting_approval"
        assert attempts(db) == []


async def test_manual_rollback_runs_through_the_gate_and_the_requester_cannot_approve(
    loop_settings, plugin, db, releases, sira, runner, operator, admin
):
    """Autopatch stays off: ops drive it. A manual action of high severity needs approvals,
    and not from the one who asked."""
    sira.control(mode="error")
    db.execute("UPDATE ops_policy SET approvals_required = 1, approval_min_severity = 'medium'")
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] in ("escalated", "blocked_by_policy"))
        key = incident_id(db)
        response = await loop.client.post(
            f"/api/ops/plugin-incidents/{key}/manual-action",
            json={"action": "patch", "patch_version": "1.2.3", "comment": "vendor fix"},
            headers=operator.auth,
        )
        assert response.status_code == 200, response.text
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        assert (await approve(loop, key, operator)).status_code == 403
        assert (await approve(loop, key, admin)).status_code == 200
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
    assert attempts(db) == [("patch", "1.2.2", "1.2.3", "applying", "manual")]
    row = db.execute("SELECT requested_by, automatic FROM plugin_autopatch_attempts").fetchone()
    assert row == ("user:otto", False)
    # Manual commands are not held by the kill switch (autopatch is off).
    assert commands(db) == [("update", "1.2.3", "pending", False)]


async def test_manual_action_bad_input_is_a_clear_4xx(
    loop_settings, plugin, db, releases, sira, runner, operator, viewer
):
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        key = incident_id(db)
        url = f"/api/ops/plugin-incidents/{key}/manual-action"
        cases = [
            ({"action": "reboot"}, operator, 422),
            ({"action": "patch"}, operator, 422),
            ({"action": "patch", "patch_version": "9.9.9"}, operator, 422),
            ({"action": "patch", "patch_version": "1.2.3"}, viewer, 403),
        ]
        for body, persona, status in cases:
            response = await loop.client.post(url, json=body, headers=persona.auth)
            assert response.status_code == status, (body, response.text)
            assert "error" in response.json()
        missing = await loop.client.post(
            "/api/ops/plugin-incidents/00000000-0000-0000-0000-000000000000/manual-action",
            json={"action": "ignore"},
            headers=operator.auth,
        )
        assert missing.status_code == 404
        ignored = await loop.client.post(url, json={"action": "ignore"}, headers=operator.auth)
        assert ignored.json()["status"] == "ignored"
        again = await loop.client.post(url, json={"action": "resolve"}, headers=operator.auth)
        assert again.status_code == 409


# --- rollbacks: staged unless back to the known-good version ---------------------------------


async def ask_for_rollback(loop: Loop, db: Any, plugin: Plugin, persona: Persona) -> httpx.Response:
    await sick_plugin(loop, plugin, db)
    await loop.until(db, lambda: incident_status(db)[0] in ("escalated", "blocked_by_policy"))
    return await loop.client.post(
        f"/api/ops/plugin-incidents/{incident_id(db)}/manual-action",
        json={"action": "rollback", "patch_version": "1.2.1"},
        headers=persona.auth,
    )


async def test_a_rollback_to_a_version_never_run_here_is_staged_like_a_patch(
    loop_settings, plugin, db, releases, tmp_path, sira, runner, operator
):
    """1.2.1 is not this installation's known-good version: calling the change a rollback
    does not skip staging, and it needs a signed release as a patch does."""
    sira.control(mode="error")
    runner.control(fail_versions=["1.2.1"])
    async with healing_loop(loop_settings) as loop:
        refused = await ask_for_rollback(loop, db, plugin, operator)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["field"] == "patch_version"
        assert "not this installation's known-good version" in refused.json()["error"]["message"]
        await add_release(loop_settings, tmp_path, plugin.name, "1.2.1")
        asked = await loop.client.post(
            f"/api/ops/plugin-incidents/{incident_id(db)}/manual-action",
            json={"action": "rollback", "patch_version": "1.2.1"},
            headers=operator.auth,
        )
        assert asked.status_code == 200, asked.text
        await loop.until(db, lambda: incident_status(db)[0] == "escalated" and bool(attempts(db)))
    assert attempts(db) == [("rollback", "1.2.2", "1.2.1", "failed", "manual")]
    assert commands(db) == []
    reason = db.execute("SELECT failure_reason FROM plugin_autopatch_attempts").fetchone()[0]
    assert "staging failed" in reason


async def test_a_rollback_to_the_known_good_version_skips_staging(
    loop_settings, plugin, db, releases, sira, runner, operator
):
    """1.2.1 ran healthy here for a whole health window before 1.2.2: going back to it needs
    no staging and no release (the plugin holds it)."""
    sira.control(mode="error")
    runner.control(fail_versions=["1.2.1"])
    db.execute(
        "UPDATE merchant_plugins SET known_good_version = '1.2.1', known_good_at = now()"
        " WHERE id = %s",
        (plugin.id,),
    )
    async with healing_loop(loop_settings) as loop:
        asked = await ask_for_rollback(loop, db, plugin, operator)
        assert asked.status_code == 200, asked.text
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
    assert attempts(db) == [("rollback", "1.2.2", "1.2.1", "applying", "manual")]
    assert commands(db) == [("rollback", "1.2.1", "pending", False)]
    report = db.execute("SELECT staging_report FROM plugin_autopatch_attempts").fetchone()[0]
    assert "known-good version" in report["skipped"]


# --- decision service down -----------------------------------------------------------------


async def test_decision_service_down_falls_back_and_says_so(
    loop_settings, plugin, db, releases, sira, runner
):
    sira.control(mode="error")
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] not in ("detected", "deciding"))
    decision = db.execute("SELECT sira_decision FROM plugin_incidents").fetchone()[0]
    assert decision["source"] == "fallback" and "HTTP 500" in decision["fallback_reason"]
    # No regression, no track record for 1.2.3: the fallback escalates.
    assert decision["action"] == "escalate"
    assert incident_status(db)[0] == "escalated"


async def test_fallback_rolls_back_a_regression_after_an_update(
    loop_settings, tmp_path, db, sira, runner
):
    sira.control(mode="error")
    plugin = await register(loop_settings, version="1.2.3")
    for version in ("1.2.2", "1.2.3"):
        await add_release(loop_settings, tmp_path, plugin.name, version)
    # A regression is high severity: let the policy act on it without approvals.
    enable_autopatch(
        db,
        plugin.tenant,
        min_confidence=0.6,
        autopatch_max_severity="high",
        approval_min_severity="critical",
    )
    async with healing_loop(loop_settings) as loop:
        # The installation runs 1.2.2, updates itself to 1.2.3, and 1.2.3 fails.
        db.execute(
            "UPDATE merchant_plugins SET plugin_version = '1.2.2' WHERE id = %s", (plugin.id,)
        )
        await beat(loop, plugin, "1.2.2", HEALTHY)
        await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS)
        await detect_once(loop.healer.maker, loop.settings)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
    decision = db.execute(
        "SELECT sira_decision FROM plugin_incidents WHERE status = 'applying'"
    ).fetchone()[0]
    assert decision["source"] == "fallback" and decision["rule"] == "rollback_after_update"
    assert attempts(db)[0][:3] == ("rollback", "1.2.3", "1.2.2")


async def test_breaker_opens_on_repeated_failures_and_recovers(
    loop_settings, plugin, db, releases, sira, runner
):
    sira.control(mode="error")
    async with healing_loop(loop_settings) as loop:
        for _ in range(2):
            await loop.decisions.decide(
                *await _facts(loop, plugin),
            )
        assert loop.decisions.breaker.state == "open"
        calls = sira.decide_calls()
        await loop.decisions.decide(*await _facts(loop, plugin))
        assert sira.decide_calls() == calls  # open: not even asked
        sira.control(mode="normal")
        await asyncio.sleep(0.6)  # the cool-down
        decision = await loop.decisions.decide(*await _facts(loop, plugin))
        assert decision.source == "sira" and loop.decisions.breaker.state == "closed"


async def _facts(loop: Loop, plugin: Plugin) -> tuple[Any, list[str]]:
    from datetime import UTC, datetime

    from app.decisions.schemas import IncidentFacts

    return (
        IncidentFacts(
            id="00000000-0000-0000-0000-000000000001",
            type="webhook_fail_rate",
            severity="medium",
            plugin=plugin.name,
            current_version="1.2.2",
            previous_version=None,
            detected_at=datetime.now(UTC),
        ),
        ["1.2.3"],
    )


# --- the runbook's SQL ---------------------------------------------------------------------


async def test_runbook_cancel_pending_patches_verbatim(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        db.execute(
            "UPDATE plugin_autopatch_attempts \nSET status = 'cancelled' \n"
            "WHERE status IN ('pending', 'staging', 'applying');"
        )
        assert await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS) == []
        await loop.until(db, lambda: incident_status(db)[0] == "cancelled")
    assert commands(db) == [("update", "1.2.3", "cancelled", True)]
    who = db.execute(
        "SELECT db_user FROM plugin_autopatch_attempt_events WHERE new_status = 'cancelled'"
    ).fetchone()
    assert who == ("postgres",)


async def test_runbook_rollback_all_recent_patches_verbatim_issues_rollback_commands(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        await ack(loop, plugin, (await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS))[0])
        for _ in range(2):
            await beat(loop, plugin, "1.2.3", HEALTHY)
        await loop.until(db, lambda: incident_status(db)[0] == "resolved")
        db.execute(
            "UPDATE plugin_autopatch_attempts \nSET status = 'rolled_back',\n"
            "    rollback_reason = 'Emergency rollback',\n    rolled_back_at = now()\n"
            "WHERE status = 'success' \n  AND executed_at > now() - interval '1 hour';"
        )
        await loop.healer.follow_sql_rollbacks()
        await loop.healer.follow_sql_rollbacks()  # twice: still one command
        got = await beat(loop, plugin, "1.2.3", HEALTHY)
    assert [(c["type"], c["payload"]["version"]) for c in got] == [("rollback", "1.2.2")]
    assert [c[:2] for c in commands(db)] == [("update", "1.2.3"), ("rollback", "1.2.2")]


# --- notifications -------------------------------------------------------------------------


async def add_endpoint(settings: Settings, tenant: str | None) -> None:
    from app.notifications.egress import WebhookPolicy
    from app.notifications.service import add_endpoint as add

    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            await add(
                session,
                SecretBox(settings.secret_key),
                url="https://hooks.example/selfheal",
                # Never sent here (only queued): the name, which resolves nowhere, is allowed.
                policy=WebhookPolicy(allow_hosts=frozenset({"hooks.example"})),
                tenant_id=tenant,
            )
    finally:
        await engine.dispose()


async def test_tenant_and_ops_hear_of_each_step_through_the_outbox(
    loop_settings, plugin, other_plugin, db, releases, sira, runner
):
    await add_endpoint(loop_settings, None)  # ops
    await add_endpoint(loop_settings, plugin.tenant)
    await add_endpoint(loop_settings, other_plugin.tenant)  # must hear nothing
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        await ack(loop, plugin, (await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS))[0])
        for _ in range(2):
            await beat(loop, plugin, "1.2.3", HEALTHY)
        await loop.until(db, lambda: incident_status(db)[0] == "resolved")
    rows = db.execute(
        "SELECT e.tenant_id, o.topic, o.payload->>'text' FROM outbox o"
        " JOIN notification_endpoints e ON e.id = o.endpoint_id ORDER BY o.id"
    ).fetchall()
    by_endpoint: dict[str | None, list[str]] = {}
    for tenant, topic, _ in rows:
        by_endpoint.setdefault(tenant, []).append(topic)
    assert by_endpoint == {
        None: ["incident_opened", "patch_succeeded"],
        plugin.tenant: ["incident_opened", "patch_succeeded"],
    }
    assert all(text_ and "webhook_fail_rate" in text_ for _, _, text_ in rows)
    # The outcome also waits for the decision service's /feedback.
    assert db.execute("SELECT topic FROM outbox WHERE kind = 'feedback'").fetchall() == [
        ("feedback",)
    ]


# --- delivery bounds, quarantine, learning -------------------------------------------------


async def test_a_command_never_acknowledged_fails_the_attempt_after_bounded_deliveries(
    loop_settings, plugin, db, releases, sira, runner
):
    settings = loop_settings.model_copy(update={"command_max_deliveries": 2})
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        delivered = 0
        for _ in range(4):  # the plugin takes it, never answers; leases run out
            delivered += len(await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS))
            await asyncio.sleep(loop_settings.command_lease_s + 0.1)
        assert delivered == 2
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
    row = db.execute("SELECT status, failure_reason FROM plugin_autopatch_attempts").fetchone()
    assert row[0] == "failed" and "did not acknowledge the update command after 2" in row[1]
    assert commands(db) == [("update", "1.2.3", "expired", True)]


async def rolled_back_elsewhere(settings: Settings, db: Any, tenants: list[str]) -> None:
    """One installation per entry of `tenants` (of that tenant), patched to 1.2.3 earlier and
    rolled back from it."""
    for tenant in tenants:
        other = await register(settings, tenant=tenant)
        incident = db.execute(
            "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,"
            " plugin_version, type, severity, status) VALUES (%s, %s, 'payments', '1.2.2',"
            " 'webhook_fail_rate', 'medium', 'rolled_back') RETURNING id",
            (other.id, other.tenant),
        ).fetchone()[0]
        db.execute(
            "INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, action,"
            " from_version, to_version, status) VALUES (%s, %s, 'patch', '1.2.2', '1.2.3',"
            " 'rolled_back')",
            (incident, other.id),
        )


async def patched_and_rolled_back(loop: Loop, plugin: Plugin, db: Any) -> None:
    """The loop patches the sick plugin to 1.2.3, which does not heal it: rolled back."""
    await sick_plugin(loop, plugin, db)
    await loop.until(db, lambda: incident_status(db)[0] == "applying")
    await ack(loop, plugin, (await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS))[0])
    await loop.until(db, lambda: incident_status(db)[0] == "rolling_back", timeout=30)
    await ack(loop, plugin, (await beat(loop, plugin, "1.2.3", FAILING_WEBHOOKS))[0])
    await healthy_again(loop, plugin, "1.2.2")
    await loop.until(db, lambda: incident_status(db)[0] == "rolled_back")


def quarantine_of(db: Any, version: str) -> tuple[bool, str | None]:
    row = db.execute(
        "SELECT quarantined_at IS NOT NULL, quarantine_reason FROM plugin_releases"
        " WHERE version = %s",
        (version,),
    ).fetchone()
    return (row[0], row[1])


async def test_rollbacks_across_tenants_quarantine_a_release(
    loop_settings, plugin, db, releases, sira, runner
):
    """The third rollback from 1.2.3 (SELFHEAL_QUARANTINE_AFTER_ROLLBACKS), on installations of
    three tenants (at least SELFHEAL_QUARANTINE_MIN_TENANTS): quarantined for everyone."""
    await rolled_back_elsewhere(loop_settings, db, ["merchant-2", "merchant-3"])
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await patched_and_rolled_back(loop, plugin, db)
    quarantined, reason = quarantine_of(db, "1.2.3")
    assert quarantined and reason is not None
    assert "rolled back 3 times across the fleet, on the installations of 3 tenants" in reason
    assert db.execute("SELECT count(*) FROM plugin_release_tenant_blocks").fetchone()[0] == 0


async def test_rollbacks_from_one_tenant_do_not_quarantine_for_another_tenant(
    loop_settings, plugin, db, releases, sira, runner
):
    """Three rollbacks from 1.2.3, all on merchant-1's installations (whose telemetry is
    merchant-1's to send): 1.2.3 is blocked for merchant-1, and merchant-2 still gets it."""
    await rolled_back_elsewhere(loop_settings, db, [plugin.tenant, plugin.tenant])
    other = await register(loop_settings, tenant="merchant-2")
    neighbour = await register(loop_settings, tenant=plugin.tenant)
    enable_autopatch(db, plugin.tenant, other.tenant)
    async with healing_loop(loop_settings) as loop:
        await patched_and_rolled_back(loop, plugin, db)
        assert quarantine_of(db, "1.2.3") == (False, None)
        blocks = db.execute(
            "SELECT plugin_name, version, tenant_id, reason FROM plugin_release_tenant_blocks"
        ).fetchall()
        assert [b[:3] for b in blocks] == [("payments", "1.2.3", plugin.tenant)]
        assert "rolled back 3 times on tenant merchant-1's installations" in blocks[0][3]
        # Another tenant's sick installation is patched to 1.2.3 as before...
        await beat(loop, other, "1.2.2", FAILING_WEBHOOKS)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        got = await beat(loop, other, "1.2.2", FAILING_WEBHOOKS)
        assert [(c["type"], c["payload"]["version"]) for c in got] == [("update", "1.2.3")]
        # ...while merchant-1's next one is not offered 1.2.3 again (nothing else to offer).
        await beat(loop, neighbour, "1.2.2", FAILING_WEBHOOKS)
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
    assert (
        db.execute(
            "SELECT count(*) FROM plugin_autopatch_attempts WHERE installation_id = %s",
            (neighbour.id,),
        ).fetchone()[0]
        == 0
    )


async def test_fallback_patches_to_the_version_with_the_best_observed_outcomes(
    loop_settings, plugin, db, releases, tmp_path, sira, runner
):
    """With the decision service down, our own record decides: 1.2.4 healed this incident type
    on other installations, 1.2.3 did not."""
    sira.control(mode="error")
    await add_release(loop_settings, tmp_path, plugin.name, "1.2.4")
    others = [await register(loop_settings, tenant=f"m-{n}") for n in range(8)]
    for n, other in enumerate(others):
        incident = db.execute(
            "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,"
            " plugin_version, type, severity, status) VALUES (%s, %s, 'payments', '1.2.2',"
            " 'webhook_fail_rate', 'medium', 'resolved') RETURNING id",
            (other.id, other.tenant),
        ).fetchone()[0]
        to_version, outcome = ("1.2.4", "success") if n < 6 else ("1.2.3", "rolled_back")
        db.execute(
            "INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, from_version,"
            " to_version, status) VALUES (%s, %s, '1.2.2', %s, %s)",
            (incident, other.id, to_version, outcome),
        )
    enable_autopatch(db, plugin.tenant, min_confidence=0.5)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] in ("staging", "applying"))
    decision = db.execute(
        "SELECT sira_decision FROM plugin_incidents WHERE installation_id = %s", (plugin.id,)
    ).fetchone()[0]
    assert decision["source"] == "fallback"
    assert (decision["action"], decision["patch_version"]) == ("patch", "1.2.4")
    assert decision["rule"] == "best_observed_candidate"


async def test_one_tenants_outcomes_alone_do_not_convince_the_fallback_for_another(
    loop_settings, plugin, db, releases, tmp_path, sira, runner
):
    """Eight successes with 1.2.4, all on one other tenant's installations: outcome statistics
    weigh tenants, so that is one tenant's word, under the fallback's minimum of 3 samples."""
    sira.control(mode="error")
    await add_release(loop_settings, tmp_path, plugin.name, "1.2.4")
    for _ in range(8):
        other = await register(loop_settings, tenant="m-noisy")
        incident = db.execute(
            "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name,"
            " plugin_version, type, severity, status) VALUES (%s, %s, 'payments', '1.2.2',"
            " 'webhook_fail_rate', 'medium', 'resolved') RETURNING id",
            (other.id, other.tenant),
        ).fetchone()[0]
        db.execute(
            "INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, from_version,"
            " to_version, status) VALUES (%s, %s, '1.2.2', '1.2.4', 'success')",
            (incident, other.id),
        )
    enable_autopatch(db, plugin.tenant, min_confidence=0.1)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] not in ("detected", "deciding"))
    decision = db.execute(
        "SELECT sira_decision FROM plugin_incidents WHERE installation_id = %s", (plugin.id,)
    ).fetchone()[0]
    assert decision["source"] == "fallback"
    assert decision["action"] == "escalate"
    assert "best observed" not in decision["explanation"]
    mine = "SELECT count(*) FROM plugin_autopatch_attempts WHERE installation_id = %s"
    assert db.execute(mine, (plugin.id,)).fetchone()[0] == 0


async def test_a_gate_that_refuses_after_staging_cancels_the_attempt_and_waits_for_approval(
    loop_settings, plugin, db, releases, sira, runner, operator, admin
):
    """Severity rose during staging (a fleet incident raises its members to high): the staged
    patch now needs approvals. It waits where approvals reach it, not in staging."""
    runner.control(delay_s=0.5)
    enable_autopatch(db, plugin.tenant, autopatch_max_severity="high", approvals_required=1)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: bool(attempts(db)) and attempts(db)[0][3] == "staging")
        db.execute("UPDATE plugin_incidents SET severity = 'high'")
        await loop.until(db, lambda: incident_status(db)[0] == "awaiting_approval")
        assert attempts(db)[0][3] == "cancelled" and commands(db) == []
        assert (await approve(loop, incident_id(db), operator)).status_code == 200
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
    assert [a[3] for a in attempts(db)] == ["cancelled", "applying"]


async def test_an_attempt_failed_in_sql_takes_its_queued_command_with_it(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        db.execute(
            "UPDATE plugin_autopatch_attempts SET status = 'failed',"
            " failure_reason = 'ops: wrong release' WHERE status = 'applying'"
        )
        assert await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS) == []
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
    assert commands(db) == [("update", "1.2.3", "cancelled", True)]


async def test_metrics_show_what_waits_for_ops(loop_settings, plugin, db, releases, sira, runner):
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
        metrics = (await loop.client.get("/metrics")).text
    assert 'selfheal_incidents_open{severity="medium",status="blocked_by_policy"} 1.0' in metrics
