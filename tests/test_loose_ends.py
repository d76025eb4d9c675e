"""The healing loop's loose ends (issue 11, item 4), each through the way a user meets it: the
plugin's heartbeats and acks over the API, the runbook's kill switch in SQL, the loop driven
in process with the reference decision service and staging runner (tests/test_healing.py),
and the outbox a webhook receiver reads from."""

from __future__ import annotations

from typing import Any

import pytest

from app.incidents.detection import detect_once
from tests.support.healing import (
    FAILING_WEBHOOKS,
    beat,
    enable_autopatch,
    healing_loop,
    incident_status,
)
from tests.test_healing import add_endpoint, releases, sick_plugin

pytestmark = pytest.mark.timeout(120)

__all__ = ["releases"]  # the fixture, shared with tests/test_healing.py


def command_of_attempt(db: Any, command_id: str) -> tuple[Any, ...]:
    row = db.execute(
        "SELECT c.status, c.held_at IS NOT NULL, c.delivery_count, a.status"
        " FROM plugin_agent_commands c JOIN plugin_autopatch_attempts a ON a.id = c.attempt_id"
        " WHERE c.id = %s",
        (command_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


# --- held commands --------------------------------------------------------------------------


async def test_a_command_the_plugin_had_when_the_kill_switch_was_engaged_is_never_sent_again(
    loop_settings, plugin, db, releases, sira, runner
):
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        got = await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        assert [c["type"] for c in got] == ["update"]
        held = got[0]["id"]
        # The runbook's kill switch, while the plugin holds the command; the plugin never
        # answers and its lease runs out.
        db.execute("UPDATE ops_policy SET autopatch_enabled = false WHERE id = 1;")
        db.execute(
            "UPDATE plugin_agent_commands SET lease_expires_at = now() - interval '1 second'"
            " WHERE id = %s",
            (held,),
        )
        assert await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS) == []
        # The loop hands the attempt back: cancelled, the incident waits for the gate.
        await loop.until(db, lambda: incident_status(db)[0] == "blocked_by_policy")
        assert command_of_attempt(db, held) == ("expired", True, 1, "cancelled")
        assert "held by the kill switch" in (incident_status(db)[1] or "")

        # Autopatch back on: the gate decides again and a new attempt sends a new command;
        # the held one never goes out again. (No cooldown: the cancelled attempt counts.)
        enable_autopatch(db, plugin.tenant, cooldown_s=0)
        await loop.until(db, lambda: incident_status(db)[0] == "applying")
        again = await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
    assert [c["type"] for c in again] == ["update"]
    assert again[0]["id"] != held
    assert command_of_attempt(db, held) == ("expired", True, 1, "cancelled")


# --- the outbox's due index -----------------------------------------------------------------

DUE = """
    SELECT id FROM outbox
    WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= now()
      AND (CAST(%s AS boolean) OR kind = 'notification')
    ORDER BY next_attempt_at, id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
"""


def test_the_outbox_due_index_leaves_out_dead_rows_and_the_due_query_uses_it(db):
    # A receiver that was down for days: thousands of dead rows, a few due ones.
    db.execute(
        "INSERT INTO outbox (kind, topic, payload, attempts, next_attempt_at, dead_at)"
        " SELECT 'notification', 'escalated', '{}'::jsonb, 12, now() - interval '1 day',"
        "        now() - interval '1 hour' FROM generate_series(1, 20000)"
    )
    db.execute(
        "INSERT INTO outbox (kind, topic, payload) SELECT 'notification', 'escalated',"
        " '{}'::jsonb FROM generate_series(1, 20)"
    )
    db.execute("ANALYZE outbox")
    definition = db.execute(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_outbox_due'"
    ).fetchone()[0]
    assert "dead_at IS NULL" in definition and "delivered_at IS NULL" in definition
    for include_feedback in (False, True):
        plan = "\n".join(
            row[0] for row in db.execute("EXPLAIN " + DUE, (include_feedback,)).fetchall()
        )
        assert "ix_outbox_due" in plan, plan
    # The dead rows are not in it: a metapage and one leaf page hold the 20 live rows (with
    # the 20,000 dead ones it was over 50 pages).
    assert db.execute("SELECT pg_relation_size('ix_outbox_due')").fetchone()[0] <= 2 * 8192
    assert len(db.execute(DUE, (True,)).fetchall()) == 20


# --- patch_failed ---------------------------------------------------------------------------


async def test_a_failed_attempt_sends_patch_failed_with_the_documented_payload(
    loop_settings, plugin, db, releases, sira, runner
):
    await add_endpoint(loop_settings, None)  # ops
    await add_endpoint(loop_settings, plugin.tenant)
    runner.control(fail_versions=["1.2.3"])
    enable_autopatch(db, plugin.tenant)
    async with healing_loop(loop_settings) as loop:
        await sick_plugin(loop, plugin, db)
        await loop.until(db, lambda: incident_status(db)[0] == "escalated")
    rows = db.execute(
        "SELECT e.tenant_id, o.topic, o.payload FROM outbox o"
        " JOIN notification_endpoints e ON e.id = o.endpoint_id ORDER BY o.id"
    ).fetchall()
    by_endpoint: dict[str | None, list[str]] = {}
    for tenant, topic, _ in rows:
        by_endpoint.setdefault(tenant, []).append(topic)
    expected = ["incident_opened", "patch_failed", "escalated"]
    assert by_endpoint == {None: expected, plugin.tenant: expected}
    payload = next(p for _, topic, p in rows if topic == "patch_failed")
    assert set(payload) == {"event", "occurred_at", "incident", "attempt", "detail", "text"}
    assert payload["event"] == "patch_failed"
    assert set(payload["incident"]) == {
        "id",
        "type",
        "severity",
        "status",
        "status_reason",
        "tenant_id",
        "installation_id",
        "plugin_name",
        "plugin_version",
        "detected_at",
    }
    assert payload["incident"]["status"] == "escalated"
    assert payload["incident"]["tenant_id"] == plugin.tenant
    attempt = payload["attempt"]
    assert (attempt["action"], attempt["from_version"], attempt["to_version"]) == (
        "patch",
        "1.2.2",
        "1.2.3",
    )
    assert attempt["status"] == "failed"
    assert attempt["failure_reason"].startswith("staging failed")
    assert "patch to 1.2.3 failed (staging failed" in payload["text"]


# --- a missed heartbeat mutes the installation's open incidents ------------------------------


def webhook_incident(db: Any) -> tuple[Any, ...]:
    row = db.execute(
        "SELECT status, muted_at IS NOT NULL, status_reason, decided_at IS NOT NULL"
        " FROM plugin_incidents WHERE type = 'webhook_fail_rate'"
    ).fetchone()
    assert row is not None
    return tuple(row)


async def test_a_missed_heartbeat_mutes_the_open_incidents_of_its_installation(
    loop_settings, plugin, db, releases, sira, runner
):
    # The loop would otherwise decide on the missed heartbeat itself right away.
    settings = loop_settings.model_copy(update={"missed_decide_after_s": 3600})
    async with healing_loop(settings) as loop:
        await sick_plugin(loop, plugin, db)  # webhook_fail_rate, detected
        # The installation goes silent before the loop looked at the incident.
        db.execute(
            "UPDATE merchant_plugins SET next_expected_at = now() - interval '1 hour'"
            " WHERE id = %s",
            (plugin.id,),
        )
        await detect_once(loop.healer.maker, settings)
        assert db.execute(
            "SELECT status FROM plugin_incidents WHERE type = 'heartbeat_missed'"
        ).fetchall() == [("detected",)]
        for _ in range(3):
            await loop.turn()
        status, muted, reason, decided = webhook_incident(db)
        assert (status, muted, decided) == ("detected", True, False)
        assert reason.startswith("muted: the installation's heartbeats are missing")

        # Heartbeats return (still failing webhooks): the missed-heartbeat incident resolves,
        # the mark is cleared and the loop decides (autopatch is off: blocked by the policy).
        for _ in range(settings.recovery_heartbeats):
            await beat(loop, plugin, "1.2.2", FAILING_WEBHOOKS)
        await loop.until(db, lambda: webhook_incident(db)[0] == "blocked_by_policy")
    assert webhook_incident(db)[1:4:2] == (False, True)
    assert db.execute(
        "SELECT status FROM plugin_incidents WHERE type = 'heartbeat_missed'"
    ).fetchall() == [("resolved",)]
