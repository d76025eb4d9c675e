"""The data the dashboard's fleet, attempts and KPI pages show, read from a real database:
KPIs and their series (app/incidents/queries.py), the fleet (app/plugins/queries.py), the
releases' outcomes (app/releases/repository.py) and an attempt's proof
(app/healing/queries.py). Rows are put in place as in tests/test_incidents_api.py."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, timedelta

import pytest

from app.healing.queries import attempt_proof
from app.incidents import queries
from app.plugins.queries import (
    BadFleetCursor,
    count_by_health,
    decode_fleet_cursor,
    encode_fleet_cursor,
    installation_detail,
    list_installations,
)
from app.releases.repository import release_outcomes
from tests.support.personas import make_user
from tests.support.plugins import heartbeat_body, register, send_heartbeat
from tests.support.reads import add_attempt, add_incident, add_release, add_vote, reading

SIRA = {"source": "sira", "action": "patch"}

# --- KPIs ----------------------------------------------------------------------------------


async def test_mttr_of_the_loop_counts_only_incidents_it_healed_or_rolled_back(
    settings, client, viewer, db, plugin
):
    def closed(status: str, minutes: float) -> str:
        return add_incident(
            db,
            plugin.id,
            status=status,
            detected_ago_s=3600,
            first_bad_before_s=30,
            resolved_after_s=minutes * 60,
        )

    healed = closed("resolved", 4)
    add_attempt(db, incident_id=healed, installation_id=plugin.id, status="success")
    rolled = closed("rolled_back", 6)
    add_attempt(db, incident_id=rolled, installation_id=plugin.id, status="rolled_back")
    closed("resolved", 20)  # recovered by itself: no attempt
    by_hand = closed("resolved", 40)  # the loop's attempt failed; an operator resolved it
    add_attempt(db, incident_id=by_hand, installation_id=plugin.id, status="failed")

    async with reading(settings) as session:
        kpis = await queries.kpis(session, days=7)
    assert kpis["loop_closed_incidents"] == 2
    assert kpis["mttr_loop_s"] == 300.0  # (4 + 6) / 2 minutes
    assert kpis["mttr_s"] == (4 + 6 + 20 + 40) / 4 * 60  # unchanged meaning: every one
    assert kpis["mttd_s"] == 30.0
    # The API's answer keeps every field it had and adds the new ones.
    body = (await client.get("/api/ops/kpis", headers=viewer.auth)).json()
    assert {
        "window_days",
        "attempts",
        "success_rate",
        "rollback_rate",
        "incidents",
        "mttd_s",
        "mttr_s",
        "incidents_by_severity_24h",
    } <= set(body)
    assert (body["mttr_loop_s"], body["loop_closed_incidents"]) == (300.0, 2)
    assert body["success_rate"] == 33.333  # 1 of the 3 attempts: as before


async def test_new_kpi_fields_are_null_safe(settings, client, viewer):
    body = (await client.get("/api/ops/kpis", headers=viewer.auth)).json()
    assert body["mttr_loop_s"] is None and body["loop_closed_incidents"] == 0
    assert body["time_to_first_approval_s"] is None and body["time_to_quorum_s"] is None


async def test_severity_series_per_hour_and_per_day(settings, db, plugin):
    hour = 3600
    add_incident(db, plugin.id, severity="medium", detected_ago_s=1)
    add_incident(db, plugin.id, severity="high", detected_ago_s=hour, incident_type="crash_loop")
    add_incident(db, plugin.id, severity="high", detected_ago_s=hour, incident_type="regression")
    add_incident(db, plugin.id, severity="low", detected_ago_s=25 * hour, status="resolved")
    add_incident(db, plugin.id, severity="critical", detected_ago_s=72 * hour, status="resolved")
    add_incident(db, plugin.id, severity="low", detected_ago_s=8 * 24 * hour, status="resolved")
    async with reading(settings) as session:
        hours = await queries.severity_series(session, bucket="hour", count=24)
        days = await queries.severity_series(session, bucket="day", count=7)

    detected = [
        (row[0], row[1])
        for row in db.execute("SELECT detected_at, severity FROM plugin_incidents").fetchall()
    ]

    def expected(series, width: timedelta) -> list[dict[str, int]]:
        """Each bucket's counts from the rows' own times (an hour may turn during the test)."""
        counts = [dict.fromkeys(("low", "medium", "high", "critical"), 0) for _ in series.points]
        for at, severity in detected:
            for k, point in enumerate(series.points):
                if point.start <= at < point.start + width:
                    counts[k][severity] += 1
        return counts

    assert len(hours.points) == 24 and hours.bucket == "hour"
    starts = [p.start for p in hours.points]
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(starts))
    assert starts[-1].tzinfo == UTC and starts[-1].minute == 0
    assert [p.counts for p in hours.points] == expected(hours, timedelta(hours=1))
    assert [p.total for p in hours.points] == [sum(p.counts.values()) for p in hours.points]
    assert sum(p.total for p in hours.points) == 3  # 25 h ago is outside
    assert hours.points[-1].counts["medium"] + hours.points[-2].counts["medium"] == 1

    assert len(days.points) == 7
    assert days.points[-1].start.hour == 0
    assert [p.counts for p in days.points] == expected(days, timedelta(days=1))
    assert sum(p.total for p in days.points) == 5  # 8 days ago is outside
    assert sum(p.counts["critical"] for p in days.points[-5:-2]) == 1  # about 3 days ago


async def test_kpi_series_per_day(settings, db, plugin):
    two_days = 2 * 86400
    today = add_incident(
        db, plugin.id, status="resolved", first_bad_before_s=30, resolved_after_s=60
    )
    add_attempt(db, incident_id=today, installation_id=plugin.id, status="success")
    add_attempt(db, incident_id=None, installation_id=plugin.id, status="rolled_back")
    earlier = add_incident(
        db,
        plugin.id,
        status="resolved",
        detected_ago_s=two_days,
        first_bad_before_s=90,
        resolved_after_s=300,
    )
    add_attempt(
        db,
        incident_id=earlier,
        installation_id=plugin.id,
        status="success",
        executed_ago_s=two_days,
    )
    async with reading(settings) as session:
        series = await queries.kpi_series(session, days=7)
    assert len(series.points) == 7
    assert all(p.start.tzinfo == UTC and p.start.hour == 0 for p in series.points)
    by_day = {p.start.date(): p for p in series.points}
    days = dict(
        db.execute(
            "SELECT id::text, (detected_at AT TIME ZONE 'UTC')::date FROM plugin_incidents"
        ).fetchall()
    )
    # Each row counts on its own UTC day (the test may run across midnight).
    recent, old = by_day[days[today]], by_day[days[earlier]]
    assert old.attempts == 1 and old.success_rate == 100.0 and old.rollback_rate == 0.0
    assert (old.mttd_s, old.mttr_loop_s) == (90.0, 300.0)
    assert recent.mttd_s == 30.0 and recent.mttr_loop_s == 60.0
    assert sum(p.attempts for p in series.points) == 3
    empty = [p for p in series.points if p.start.date() not in (days[today], days[earlier])]
    assert all(p.success_rate is None and p.mttd_s is None for p in empty)


async def test_time_to_approval_first_vote_and_quorum(settings, db, plugin):
    for name in ("otto", "opal"):
        await make_user(settings, name, "operator")

    def waiting(decided_ago_s: float, incident_type: str) -> str:
        return add_incident(
            db,
            plugin.id,
            status="awaiting_approval",
            incident_type=incident_type,
            detected_ago_s=decided_ago_s + 60,
            decision={**SIRA, "confidence": 0.9},
            decided_ago_s=decided_ago_s,
        )

    quorum = waiting(600, "error_spike")
    add_vote(db, quorum, "otto", action_key="k1", after_decision_s=60)
    add_vote(db, quorum, "opal", action_key="k1", after_decision_s=180)
    one_vote = waiting(300, "crash_loop")
    add_vote(db, one_vote, "otto", action_key="k1", after_decision_s=30)
    split = waiting(480, "regression")  # two votes, but for two different actions
    add_vote(db, split, "otto", action_key="k1", after_decision_s=10)
    add_vote(db, split, "opal", action_key="k2", after_decision_s=20)
    stale = waiting(120, "webhook_fail_rate")  # voted before the latest decision: not counted
    add_vote(db, stale, "otto", action_key="k0", after_decision_s=-60)

    async with reading(settings) as session:
        result = await queries.time_to_approval(session, days=7)
        kpis = await queries.kpis(session, days=7)
    assert result.approvals_required == 2  # the policy's default
    assert result.incidents == 3
    assert result.first_vote_mean_s == pytest.approx((60 + 30 + 10) / 3, abs=0.001)
    assert result.first_vote_median_s == 30.0
    assert (result.quorum_incidents, result.quorum_mean_s, result.quorum_median_s) == (
        1,
        180.0,
        180.0,
    )
    assert kpis["time_to_first_approval_s"] == result.first_vote_mean_s
    assert kpis["time_to_quorum_s"] == 180.0

    db.execute("UPDATE ops_policy SET approvals_required = 1")
    async with reading(settings) as session:
        one = await queries.time_to_approval(session, days=7)
    assert (one.quorum_incidents, one.quorum_mean_s) == (3, pytest.approx(100 / 3, abs=0.001))


async def test_confidence_distribution_by_bucket_source_and_action(settings, db, plugin):
    decisions = [
        {"confidence": 0.85, "source": "sira", "action": "patch"},
        {"confidence": 0.8, "source": "sira", "action": "patch"},
        {"confidence": 1.0, "source": "fallback", "action": "rollback"},
        {"confidence": 0.05, "source": "fallback", "action": "escalate"},
        {"source": "fallback", "action": "escalate"},  # no confidence
    ]
    for i, decision in enumerate(decisions):
        add_incident(
            db,
            plugin.id,
            status="resolved",
            severity=("low", "medium", "high", "critical", "low")[i],
            decision=decision,
            decided_ago_s=60,
        )
    add_incident(  # decided ten days ago: outside the window
        db,
        plugin.id,
        status="resolved",
        decision={"confidence": 0.5, "source": "sira", "action": "patch"},
        decided_ago_s=10 * 86400,
    )
    async with reading(settings) as session:
        result = await queries.confidence_distribution(session, days=7)
    assert (result.total, result.without_confidence) == (4, 1)
    assert len(result.buckets) == 10
    assert [(b.lower, b.upper) for b in result.buckets[:2]] == [(0.0, 0.1), (0.1, 0.2)]
    assert [b.count for b in result.buckets] == [1, 0, 0, 0, 0, 0, 0, 0, 2, 1]
    assert result.buckets[8].by_source == {"sira": 2}
    assert result.buckets[8].by_action == {"patch": 2}
    assert result.buckets[9].by_source == {"fallback": 1}  # 1.0 is in the last bucket
    assert result.buckets[9].by_action == {"rollback": 1}
    assert result.buckets[0].by_action == {"escalate": 1}


async def test_calibration_per_source_from_the_attempts(settings, db, plugin):
    def attempt(status: str, source: str | None, confidence: float | None, **incident) -> None:
        incident_id = add_incident(db, plugin.id, status="resolved", **incident)
        add_attempt(
            db,
            incident_id=incident_id,
            installation_id=plugin.id,
            status=status,
            source=source,
            confidence=confidence,
        )

    for status, confidence in (
        ("success", 0.85),
        ("success", 0.85),
        ("rolled_back", 0.82),
        ("failed", 0.88),
        ("cancelled", 0.95),  # nothing was applied: says nothing
        ("pending", 0.95),  # not finished yet
    ):
        attempt(status, "sira", confidence)
    attempt("success", "manual", None)  # an operator's: no prediction
    # An attempt without its own source and confidence: the incident's decision says.
    attempt(
        "success",
        None,
        None,
        decision={"confidence": 0.55, "source": "fallback", "action": "patch"},
        decided_ago_s=60,
    )
    async with reading(settings) as session:
        result = await queries.calibration(session, days=7)
    sira, fallback = result.series
    assert (sira.source, fallback.source) == ("sira", "fallback")
    assert len(sira.buckets) == len(fallback.buckets) == 10
    bucket = sira.buckets[8]
    assert (bucket.lower, bucket.upper) == (0.8, 0.9)
    assert (bucket.attempts, bucket.successes, bucket.actual) == (4, 2, 0.5)
    assert bucket.predicted == pytest.approx(0.85)
    assert sira.buckets[9].attempts == 0 and sira.buckets[9].actual is None
    assert [b.attempts for b in fallback.buckets] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert (fallback.buckets[5].predicted, fallback.buckets[5].actual) == (0.55, 1.0)


# --- the fleet -----------------------------------------------------------------------------


async def test_fleet_health_filters_and_paging(settings, client, db):
    ok = await register(settings, tenant="merchant-a")
    overdue = await register(settings, tenant="merchant-b")
    unseen = await register(settings, tenant="merchant-c")
    sick = await register(settings, tenant="merchant-d", name="orders", version="2.0.0")
    for installation in (ok, overdue, sick):
        body = heartbeat_body(plugin_version="2.0.0" if installation is sick else "1.2.2")
        assert (await send_heartbeat(client, installation, body)).status_code == 200
    db.execute(
        "UPDATE merchant_plugins SET next_expected_at = now() - interval '1 minute' WHERE id = %s",
        (overdue.id,),
    )
    low = add_incident(db, sick.id, tenant="merchant-d", plugin="orders", severity="low")
    high = add_incident(
        db,
        sick.id,
        tenant="merchant-d",
        plugin="orders",
        severity="high",
        incident_type="crash_loop",
    )
    add_incident(  # closed: not the installation's health any more
        db, ok.id, tenant="merchant-a", severity="critical", status="resolved"
    )

    async with reading(settings) as session:
        page = await list_installations(session, limit=10)
        by_id = {str(item.id): item for item in page.items}
        assert [str(i.id) for i in page.items] == [ok.id, overdue.id, unseen.id, sick.id]
        assert page.next_after is None
        assert by_id[ok.id].health == "ok" and by_id[ok.id].open_incident is None
        assert by_id[overdue.id].health == "overdue"
        assert by_id[unseen.id].health == "unseen" and by_id[unseen.id].last_heartbeat_at is None
        assert by_id[sick.id].health == "incident"
        assert by_id[sick.id].open_incidents == 2
        incident = by_id[sick.id].open_incident
        assert incident is not None and str(incident.id) == high  # the most severe
        assert low != high
        assert by_id[ok.id].next_expected_at is not None

        assert await count_by_health(session) == {
            "ok": 1,
            "overdue": 1,
            "incident": 1,
            "unseen": 1,
        }
        assert await count_by_health(session, plugin="orders") == {
            "ok": 0,
            "overdue": 0,
            "incident": 1,
            "unseen": 0,
        }
        for filters, expected in (
            ({"tenant": "merchant-b"}, [overdue.id]),
            ({"plugin": "orders"}, [sick.id]),
            ({"version": "1.2.2"}, [ok.id, overdue.id, unseen.id]),
            ({"health": "overdue"}, [overdue.id]),
            ({"health": "unseen", "tenant": "merchant-a"}, []),
        ):
            found = await list_installations(session, limit=10, **filters)
            assert [str(i.id) for i in found.items] == expected, filters

        seen, after = [], None
        while True:
            page = await list_installations(session, limit=3 if after is None else 1, after=after)
            seen += [str(i.id) for i in page.items]
            if page.next_after is None:
                break
            # The cursor survives a trip through a URL.
            after = decode_fleet_cursor(encode_fleet_cursor(page.next_after))
        assert seen == [ok.id, overdue.id, unseen.id, sick.id]
    with pytest.raises(BadFleetCursor):
        decode_fleet_cursor("not-a-cursor")


async def test_installation_detail_heartbeats_and_version_history(settings, client, db, plugin):
    versions = ["1.2.2", "1.2.2", "1.2.3", "1.2.3", "1.2.2"]
    for uptime, version in enumerate(versions, start=100):
        body = heartbeat_body(plugin_version=version, uptime_s=uptime)
        assert (await send_heartbeat(client, plugin, body)).status_code == 200
    db.execute(
        "UPDATE merchant_plugins SET known_good_version = '1.2.2', known_good_at = now()"
        " WHERE id = %s",
        (plugin.id,),
    )
    async with reading(settings) as session:
        detail = await installation_detail(session, uuid.UUID(plugin.id), heartbeats=3)
        missing = await installation_detail(session, uuid.uuid4())
    assert missing is None
    assert detail is not None
    assert detail.installation.plugin_version == "1.2.2"
    assert detail.installation.known_good_version == "1.2.2"
    assert detail.known_good_at is not None
    assert detail.previous_version == "1.2.3" and detail.version_changed_at is not None
    assert detail.heartbeat_count == 5
    # The newest three, oldest first, with the counters the plugin sent.
    assert [h.plugin_version for h in detail.heartbeats] == ["1.2.3", "1.2.3", "1.2.2"]
    times = [h.received_at for h in detail.heartbeats]
    assert times == sorted(times)
    first = detail.heartbeats[0]
    assert (first.requests, first.errors, first.webhook_failures) == (1200, 3, 1)
    assert first.latency_p95_ms == 120.0
    # Runs of one version, from every stored heartbeat.
    assert [(v.version, v.heartbeats) for v in detail.versions] == [
        ("1.2.2", 2),
        ("1.2.3", 2),
        ("1.2.2", 1),
    ]
    assert all(v.first_seen <= v.last_seen for v in detail.versions)


async def test_release_outcomes_per_version(settings, db, plugin):
    add_release(db, "payments", "1.2.3")
    add_release(db, "payments", "1.2.4", quarantined=True)
    add_release(db, "orders", "1.2.3")
    db.execute("UPDATE merchant_plugins SET plugin_version = '1.2.3' WHERE id = %s", (plugin.id,))
    for status in ("success", "success", "rolled_back", "failed", "pending", "cancelled"):
        add_attempt(db, incident_id=None, installation_id=plugin.id, status=status)
    # A rollback to 1.2.3 is not a patch to it; orders 1.2.3 is another release.
    add_attempt(db, incident_id=None, installation_id=plugin.id, status="failed", action="rollback")
    orders = await register(settings, name="orders")
    add_attempt(db, incident_id=None, installation_id=orders.id, status="rolled_back")

    async with reading(settings) as session:
        every = await release_outcomes(session)
        payments = await release_outcomes(session, "payments")
    assert [(r.plugin_name, r.version) for r in every] == [
        ("orders", "1.2.3"),
        ("payments", "1.2.4"),
        ("payments", "1.2.3"),
    ]
    quarantined, current = payments
    assert quarantined.quarantined_at is not None
    assert quarantined.quarantine_reason == "rolled back twice"
    assert (quarantined.patches, quarantined.success_rate, quarantined.rollback_rate) == (
        0,
        None,
        None,
    )
    assert current.quarantined_at is None
    assert (current.patches, current.successes, current.rollbacks, current.failures) == (6, 2, 1, 1)
    assert (current.in_flight, current.cancelled, current.installations) == (1, 1, 1)
    assert (current.success_rate, current.rollback_rate) == (50.0, 25.0)
    assert every[0].rollbacks == 1 and every[0].rollback_rate == 100.0


# --- an attempt's proof --------------------------------------------------------------------


async def test_attempt_proof_lists_the_event_log_and_verifies_the_chain(settings, db, plugin):
    first = add_attempt(db, incident_id=None, installation_id=plugin.id, status="pending")
    db.execute("SELECT set_config('selfheal.actor', 'user:otto', false)")
    for status in ("staging", "applying"):
        db.execute(
            "UPDATE plugin_autopatch_attempts SET status = %s WHERE id = %s", (status, first)
        )
    later = add_attempt(db, incident_id=None, installation_id=plugin.id, status="success")

    async with reading(settings) as session:
        proof = await attempt_proof(session, uuid.UUID(first))
        assert await attempt_proof(session, uuid.uuid4()) is None
    assert proof is not None
    assert [(e.old_status, e.new_status) for e in proof.events] == [
        (None, "pending"),
        ("pending", "staging"),
        ("staging", "applying"),
    ]
    assert [e.actor for e in proof.events] == [None, "user:otto", "user:otto"]
    assert {e.db_user for e in proof.events} == {"postgres"}
    assert all(e.hash_matches and e.linked for e in proof.events)
    assert all(len(e.hash) == 64 for e in proof.events)
    assert proof.events[0].prev_hash == "00" * 32  # the chain's first event
    assert proof.events[1].prev_hash == proof.events[0].hash
    assert (proof.verified, proof.chain_verified, proof.first_broken_event_id) == (
        True,
        True,
        None,
    )

    # Someone with the power to disable the triggers rewrites who moved the later attempt.
    db.execute("ALTER TABLE plugin_autopatch_attempt_events DISABLE TRIGGER ALL")
    tampered = db.execute(
        "UPDATE plugin_autopatch_attempt_events SET actor = 'user:mallory'"
        " WHERE attempt_id = %s RETURNING id",
        (later,),
    ).fetchone()[0]
    async with reading(settings) as session:
        earlier = await attempt_proof(session, uuid.UUID(first))
        broken = await attempt_proof(session, uuid.UUID(later))
    assert broken is not None and earlier is not None
    assert broken.first_broken_event_id == tampered
    assert (broken.verified, broken.chain_verified) == (False, False)
    assert [e.hash_matches for e in broken.events] == [False]
    # The earlier attempt's events come before the break: still proven.
    assert (earlier.verified, earlier.chain_verified) == (True, False)
