"""The policy gate on a real database: each rule blocks at its threshold and not just short of
it, approvals count only when they should, the gate fails closed, and the FOR SHARE read sees a
kill switch committed while it waits."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import libpq_url
from app.policy import (
    ApprovalRefused,
    GateResult,
    ProposedAction,
    action_key,
    canary_bucket,
    evaluate,
    record_approval,
    tenant_in_canary,
)
from tests.support.personas import make_user
from tests.support.plugins import Plugin, register

KILL_SWITCH = "autopatch is disabled (kill switch)"

# Every rule passes for the `world` fixture's automatic action under this policy.
PERMISSIVE: dict[str, Any] = {
    "autopatch_enabled": True,
    "autopatch_whitelist": ["merchant-1"],
    "autopatch_max_severity": "medium",
    "min_confidence": 0.8,
    "canary_percent": 100,
    "approvals_required": 2,
    "approval_min_severity": "high",
    "max_concurrent_actions": 10,
    "max_concurrent_actions_per_tenant": 2,
    "cooldown_s": 3600,
}


@dataclasses.dataclass
class World:
    plugin: Plugin
    incident: uuid.UUID
    action: ProposedAction


@pytest.fixture
async def maker(settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings, role="test")
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def owner_maker(settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions of the tables' owner: what it takes to remove the policy row, or create a role."""
    engine = create_engine(
        settings.model_copy(update={"database_url": settings.migration_url}), role="test"
    )
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


def set_policy(db, **values: Any) -> None:
    assignments, params = [], []
    for column, value in values.items():
        if column == "autopatch_whitelist":
            assignments.append(f"{column} = %s::jsonb")
            params.append(orjson.dumps(value).decode())
        else:
            assignments.append(f"{column} = %s")
            params.append(value)
    db.execute(f"UPDATE ops_policy SET {', '.join(assignments)} WHERE id = 1", params)


def scalar(db, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = db.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def open_incident(db, plugin: Plugin, severity: str = "medium") -> uuid.UUID:
    incident: uuid.UUID = scalar(
        db,
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity, status) VALUES (%s, %s, %s, '1.2.2', 'error_spike', %s, 'deciding')"
        " RETURNING id",
        (plugin.id, plugin.tenant, plugin.name, severity),
    )
    return incident


def add_attempt(
    db,
    plugin: Plugin,
    status: str = "pending",
    *,
    created_at: datetime | None = None,
    finished_at: datetime | None = None,
) -> uuid.UUID:
    attempt: uuid.UUID = scalar(
        db,
        "INSERT INTO plugin_autopatch_attempts (installation_id, from_version, to_version, status,"
        " created_at, finished_at) VALUES (%s, '1.2.2', '1.2.3', %s, coalesce(%s, now()), %s)"
        " RETURNING id",
        (plugin.id, status, created_at, finished_at),
    )
    return attempt


def db_now(db) -> datetime:
    now: datetime = scalar(db, "SELECT now()")
    return now


def user_id(db, username: str) -> uuid.UUID:
    found: uuid.UUID = scalar(db, "SELECT id FROM ops_users WHERE username = %s", (username,))
    return found


async def gate(
    maker: async_sessionmaker[AsyncSession], action: ProposedAction, **options: Any
) -> GateResult:
    async with maker() as session, session.begin():
        return await evaluate(session, action, **options)


async def approve(
    maker: async_sessionmaker[AsyncSession],
    db,
    username: str,
    action: ProposedAction,
    ttl_s: int | None = None,
) -> None:
    async with maker() as session, session.begin():
        await record_approval(
            session, action.incident_id, user_id(db, username), action, "looks right", ttl_s
        )


async def wait_for_lock_wait(db, statement: str) -> None:
    """Until a backend of this database is waiting for a lock while running `statement`."""
    deadline = time.monotonic() + 10
    while not db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE %s",
        (f"%{statement}%",),
    ).fetchone()[0]:
        assert time.monotonic() < deadline, f"nobody waited for a lock in {statement!r}"
        await asyncio.sleep(0.02)


def proposed(plugin: Plugin, incident: uuid.UUID, **overrides: Any) -> ProposedAction:
    values: dict[str, Any] = {
        "incident_id": incident,
        "installation_id": uuid.UUID(plugin.id),
        "tenant_id": plugin.tenant,
        "plugin_name": plugin.name,
        "action": "patch",
        "from_version": "1.2.2",
        "to_version": "1.2.3",
        "severity": "medium",
        "confidence": 0.9,
        "automatic": True,
        "requested_by": "worker",
        **overrides,
    }
    return ProposedAction(**values)


def manual(action: ProposedAction, by: str = "otto", **overrides: Any) -> ProposedAction:
    return dataclasses.replace(action, automatic=False, requested_by=f"user:{by}", **overrides)


@pytest.fixture
async def world(settings, db) -> World:
    plugin = await register(settings)
    incident = open_incident(db, plugin)
    set_policy(db, **PERMISSIVE)
    return World(plugin, incident, proposed(plugin, incident))


async def test_an_action_that_passes_every_rule_is_allowed(maker, world):
    assert await gate(maker, world.action) == GateResult(
        allowed=True,
        reasons=(),
        needs_approval=False,
        approvals_have=0,
        approvals_need=0,
        action_key=action_key(world.action),
    )


async def test_every_blocking_reason_is_reported(maker, db, world):
    set_policy(db, autopatch_enabled=False, autopatch_whitelist=[])
    result = await gate(maker, world.action)
    assert result.reasons == (
        KILL_SWITCH,
        "tenant merchant-1 is not in the autopatch whitelist (the whitelist is empty)",
    )
    assert result.summary == "; ".join(result.reasons)


async def test_kill_switch_blocks_automatic_actions(maker, db, world):
    set_policy(db, autopatch_enabled=False)
    result = await gate(maker, world.action)
    assert (result.allowed, result.reasons) == (False, (KILL_SWITCH,))
    set_policy(db, autopatch_enabled=True)
    assert (await gate(maker, world.action)).allowed


async def test_kill_switch_does_not_stop_an_operator(maker, db, world):
    set_policy(db, autopatch_enabled=False, autopatch_whitelist=[], canary_percent=0)
    assert (await gate(maker, manual(world.action, confidence=None))).allowed


async def test_whitelist_names_the_tenants_patched_automatically(maker, db, world):
    set_policy(db, autopatch_whitelist=[])
    assert (await gate(maker, world.action)).reasons == (
        "tenant merchant-1 is not in the autopatch whitelist (the whitelist is empty)",
    )
    set_policy(db, autopatch_whitelist=["merchant-2"])
    assert (await gate(maker, world.action)).reasons == (
        "tenant merchant-1 is not in the autopatch whitelist",
    )
    set_policy(db, autopatch_whitelist=["merchant-2", "merchant-1"])
    assert (await gate(maker, world.action)).allowed


async def test_severity_above_the_cap_is_blocked(maker, db, world):
    set_policy(db, autopatch_max_severity="medium", approval_min_severity="critical")
    high = dataclasses.replace(world.action, severity="high")
    assert (await gate(maker, high)).reasons == (
        "severity high is above the autopatch cap (medium)",
    )
    assert (await gate(maker, dataclasses.replace(world.action, severity="medium"))).allowed
    set_policy(db, autopatch_max_severity="high")
    assert (await gate(maker, high)).allowed


async def test_confidence_below_the_minimum_is_blocked(maker, world):
    below = dataclasses.replace(world.action, confidence=0.799)
    assert (await gate(maker, below)).reasons == ("confidence 0.799 is below the minimum (0.800)",)
    assert (await gate(maker, dataclasses.replace(world.action, confidence=0.8))).allowed
    unknown = dataclasses.replace(world.action, confidence=None)
    assert (await gate(maker, unknown)).reasons == (
        "the decision has no confidence; automatic actions need one",
    )


def test_canary_membership_is_stable_and_near_the_share():
    tenants = [f"tenant-{i}" for i in range(1000)]
    first = [tenant_in_canary(t, 30) for t in tenants]
    assert [tenant_in_canary(t, 30) for t in tenants] == first
    # 1000 draws at p = 0.3: the standard deviation is 14.5, so 3 sigma is about 45.
    assert 255 <= sum(first) <= 345
    # Raising the share only adds tenants.
    assert all(tenant_in_canary(t, 31) for t, inside in zip(tenants, first, strict=True) if inside)
    assert not any(tenant_in_canary(t, 0) for t in tenants)
    assert all(tenant_in_canary(t, 100) for t in tenants)


async def test_tenant_outside_the_canary_share_is_blocked(maker, db, world):
    bucket = canary_bucket("merchant-1")
    set_policy(db, canary_percent=bucket)
    assert (await gate(maker, world.action)).reasons == (
        f"tenant merchant-1 is outside the canary share ({bucket}%; its bucket is {bucket})",
    )
    set_policy(db, canary_percent=bucket + 1)
    assert (await gate(maker, world.action)).allowed


async def test_fleet_wide_cap_on_actions_in_flight(settings, maker, db, world):
    set_policy(db, max_concurrent_actions=2, max_concurrent_actions_per_tenant=10)
    elsewhere = [await register(settings, tenant=f"merchant-{n}") for n in (2, 3)]
    add_attempt(db, elsewhere[0], "staging")
    add_attempt(db, elsewhere[1], "success")  # an outcome, not in flight
    assert (await gate(maker, world.action)).allowed
    add_attempt(db, elsewhere[1], "verifying")
    blocked = await gate(maker, world.action)
    assert blocked.reasons == ("2 actions are in flight fleet-wide (max_concurrent_actions is 2)",)
    # Manual actions are held to the same cap.
    assert (await gate(maker, manual(world.action))).reasons == blocked.reasons


async def test_per_tenant_cap_on_actions_in_flight(settings, maker, db, world):
    set_policy(db, max_concurrent_actions_per_tenant=1)
    same_tenant = await register(settings, tenant="merchant-1", name="checkout")
    other_tenant = await register(settings, tenant="merchant-2", name="checkout")
    add_attempt(db, other_tenant, "applying")
    add_attempt(db, same_tenant, "failed")
    assert (await gate(maker, world.action)).allowed
    add_attempt(db, same_tenant, "applying")
    assert (await gate(maker, world.action)).reasons == (
        "1 action is in flight for tenant merchant-1 (max_concurrent_actions_per_tenant is 1)",
    )


async def test_one_attempt_at_a_time_per_installation(maker, db, world):
    attempt = add_attempt(db, world.plugin, "pending")
    blocked = await gate(maker, manual(world.action))
    assert blocked.reasons == ("another attempt on this installation is still in flight",)
    # A later step of that same attempt is not its own rival.
    assert (await gate(maker, dataclasses.replace(world.action, attempt_id=attempt))).allowed


async def test_two_gates_at_once_cannot_both_take_the_last_slot(settings, maker, db, world):
    set_policy(db, max_concurrent_actions=1)
    other = await register(settings, tenant="merchant-2")
    second = proposed(other, open_incident(db, other))

    async def gate_then_create_attempt(action: ProposedAction) -> GateResult:
        async with maker() as session, session.begin():
            result = await evaluate(session, manual(action))
            if result.allowed:
                await session.execute(
                    text(
                        "INSERT INTO plugin_autopatch_attempts (installation_id, status)"
                        " VALUES (:id, 'pending')"
                    ),
                    {"id": action.installation_id},
                )
            return result

    async with maker() as session, session.begin():
        assert (await evaluate(session, manual(world.action))).allowed
        await session.execute(
            text("INSERT INTO plugin_autopatch_attempts (installation_id) VALUES (:id)"),
            {"id": world.action.installation_id},
        )
        rival = asyncio.create_task(gate_then_create_attempt(second))
        await wait_for_lock_wait(db, "pg_advisory_xact_lock")
        assert not rival.done()
    result = await asyncio.wait_for(rival, 10)
    assert result.reasons == ("1 action is in flight fleet-wide (max_concurrent_actions is 1)",)


async def test_cooldown_after_an_attempt_on_the_same_installation(maker, db, world):
    ended = db_now(db) - timedelta(minutes=5)
    add_attempt(
        db, world.plugin, "rolled_back", created_at=ended - timedelta(minutes=3), finished_at=ended
    )
    blocked = await gate(maker, world.action, now=ended + timedelta(seconds=3599))
    assert blocked.reasons == (
        f"cooldown: the last attempt on this installation was active at {ended.isoformat()};"
        f" automatic actions wait until {(ended + timedelta(seconds=3600)).isoformat()}"
        " (cooldown_s is 3600)",
    )
    assert (await gate(maker, world.action, now=ended + timedelta(seconds=3600))).allowed
    # An operator may act inside the cooldown: it guards against the machine flapping.
    assert (await gate(maker, manual(world.action), now=ended + timedelta(seconds=1))).allowed


async def test_cooldown_counts_from_when_an_attempt_started(maker, db, world):
    started = db_now(db)
    add_attempt(db, world.plugin, "failed", created_at=started)
    assert not (await gate(maker, world.action, now=started + timedelta(seconds=3599))).allowed
    assert (await gate(maker, world.action, now=started + timedelta(seconds=3600))).allowed


async def test_an_attempt_cancelled_before_it_was_applied_starts_no_cooldown(maker, db, world):
    """The kill switch cancels attempts that changed nothing; when ops turn autopatch back on,
    the waiting incidents must not sit out a cooldown for a change that never happened."""
    started = db_now(db)
    add_attempt(db, world.plugin, "cancelled", created_at=started)
    assert (await gate(maker, world.action, now=started + timedelta(seconds=10))).allowed


async def test_installation_of_another_tenant_is_refused(settings, maker, world):
    other = await register(settings, tenant="merchant-2", name="checkout")
    action = dataclasses.replace(world.action, installation_id=uuid.UUID(other.id))
    assert (await gate(maker, action)).reasons == (
        f"installation {other.id} belongs to tenant merchant-2, not merchant-1",
    )


@pytest.fixture
async def voters(settings) -> None:
    for username, role in (
        ("otto", "operator"),
        ("olga", "operator"),
        ("ada", "admin"),
        ("vera", "viewer"),
    ):
        await make_user(settings, username, role)


@pytest.fixture
def risky(db, world, voters) -> ProposedAction:
    """A high-severity action otto asked for: two approvals needed."""
    set_policy(db, autopatch_max_severity="critical")
    return manual(world.action, severity="high")


NEEDS_TWO = "needs 2 approvals from distinct operators (severity high); has {}"


async def test_approvals_need_a_quorum_of_distinct_users(maker, db, risky):
    assert (await gate(maker, risky)).reasons == (NEEDS_TWO.format(0),)
    await approve(maker, db, "ada", risky)
    await approve(maker, db, "ada", risky)  # voting twice is still one vote
    assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 1
    once = await gate(maker, risky)
    assert (once.allowed, once.approvals_have, once.approvals_need) == (False, 1, 2)
    assert once.reasons == (NEEDS_TWO.format(1),)
    await approve(maker, db, "olga", risky)
    result = await gate(maker, risky)
    assert (result.allowed, result.needs_approval, result.approvals_have) == (True, True, 2)


async def test_automatic_actions_need_the_same_quorum(maker, db, risky):
    automatic = dataclasses.replace(risky, automatic=True, requested_by="worker")
    assert (await gate(maker, automatic)).reasons == (NEEDS_TWO.format(0),)
    await approve(maker, db, "otto", automatic)
    await approve(maker, db, "olga", automatic)
    assert (await gate(maker, automatic)).allowed


async def test_requester_cannot_approve(maker, db, risky):
    with pytest.raises(ApprovalRefused, match="otto requested this action and cannot approve it"):
        await approve(maker, db, "otto", risky)
    # Nor does a vote written around the check count.
    db.execute(
        "INSERT INTO approvals (incident_id, user_id, action_key, expires_at)"
        " VALUES (%s, %s, %s, now() + interval '1 hour')",
        (risky.incident_id, user_id(db, "otto"), action_key(risky)),
    )
    await approve(maker, db, "ada", risky)
    assert (await gate(maker, risky)).reasons == (NEEDS_TWO.format(1),)


async def test_expired_approvals_are_ignored(maker, db, risky):
    await approve(maker, db, "ada", risky, ttl_s=60)
    await approve(maker, db, "olga", risky, ttl_s=60)
    first_expiry = db.execute("SELECT min(expires_at) FROM approvals").fetchone()[0]
    assert (await gate(maker, risky, now=first_expiry - timedelta(microseconds=1))).allowed
    assert (await gate(maker, risky, now=first_expiry)).reasons == (NEEDS_TWO.format(1),)


async def test_default_vote_lifetime_is_the_policys(maker, db, risky):
    set_policy(db, approval_ttl_s=120)
    await approve(maker, db, "ada", risky)
    lifetime = db.execute("SELECT expires_at - created_at FROM approvals").fetchone()[0]
    assert lifetime == timedelta(seconds=120)


async def test_approval_for_another_action_is_ignored(maker, db, risky):
    other_version = dataclasses.replace(risky, to_version="1.2.4")
    assert action_key(other_version) != action_key(risky)
    await approve(maker, db, "ada", other_version)
    await approve(maker, db, "olga", other_version)
    assert (await gate(maker, risky)).reasons == (NEEDS_TWO.format(0),)
    assert (await gate(maker, other_version)).allowed


async def test_viewer_and_disabled_approvals_are_ignored(maker, db, risky):
    with pytest.raises(ApprovalRefused, match="vera is a viewer"):
        await approve(maker, db, "vera", risky)
    db.execute(
        "INSERT INTO approvals (incident_id, user_id, action_key, expires_at)"
        " VALUES (%s, %s, %s, now() + interval '1 hour')",
        (risky.incident_id, user_id(db, "vera"), action_key(risky)),
    )
    await approve(maker, db, "ada", risky)
    await approve(maker, db, "olga", risky)
    assert (await gate(maker, risky)).allowed
    db.execute("UPDATE ops_users SET disabled_at = now() WHERE username = 'olga'")
    assert (await gate(maker, risky)).reasons == (NEEDS_TWO.format(1),)
    with pytest.raises(ApprovalRefused, match="olga is disabled"):
        await approve(maker, db, "olga", risky)


async def test_major_version_change_needs_approvals(maker, db, world, voters):
    set_policy(db, approval_min_severity="high")
    low = dataclasses.replace(world.action, severity="low")
    assert (await gate(maker, dataclasses.replace(low, to_version="1.9.0"))).allowed
    major = dataclasses.replace(low, to_version="2.0.0")
    assert (await gate(maker, major)).reasons == (
        "needs 2 approvals from distinct operators (major version change 1.2.2 -> 2.0.0); has 0",
    )
    # A version that cannot be read is treated as a major change.
    unknown = dataclasses.replace(low, from_version=None)
    assert (await gate(maker, unknown)).needs_approval
    # Severity just below approval_min_severity needs none.
    assert not (
        await gate(maker, dataclasses.replace(world.action, severity="medium"))
    ).needs_approval


def test_action_key_binds_the_exact_action(world):
    key = action_key(world.action)
    assert action_key(dataclasses.replace(world.action, confidence=0.5)) == key
    for change in (
        {"incident_id": uuid.uuid4()},
        {"installation_id": uuid.uuid4()},
        {"action": "rollback"},
        {"from_version": "1.2.1"},
        {"to_version": "1.2.4"},
    ):
        assert action_key(dataclasses.replace(world.action, **change)) != key, change


def test_malformed_actions_are_refused(world):
    with pytest.raises(ValueError, match="severity"):
        dataclasses.replace(world.action, severity="extreme")
    with pytest.raises(ValueError, match="confidence"):
        dataclasses.replace(world.action, confidence=1.5)


async def test_missing_policy_row_fails_closed(owner_maker, world):
    async with owner_maker() as session:
        # The row is protected by a trigger; only this rolled-back transaction lifts it.
        await session.execute(text("ALTER TABLE ops_policy DISABLE TRIGGER ops_policy_no_delete"))
        await session.execute(text("DELETE FROM ops_policy WHERE id = 1"))
        result = await evaluate(session, world.action)
        await session.rollback()
    assert (result.allowed, result.reasons) == (
        False,
        ("the ops_policy row (id = 1) is missing; failing closed",),
    )


async def test_unreadable_policy_fails_closed_and_leaves_the_transaction_usable(owner_maker, world):
    role = f"selfheal_no_policy_{uuid.uuid4().hex[:8]}"
    async with owner_maker() as session:
        # Created and dropped with this transaction: a role that may not read ops_policy.
        await session.execute(text(f'CREATE ROLE "{role}" NOLOGIN'))
        await session.execute(text(f'SET LOCAL ROLE "{role}"'))
        result = await evaluate(session, world.action)
        still_usable = (await session.execute(text("SELECT 1"))).scalar_one()
        await session.rollback()
    assert (result.allowed, result.reasons) == (
        False,
        (
            "the ops policy could not be checked (permission denied for table ops_policy);"
            " failing closed",
        ),
    )
    assert still_usable == 1


async def test_gate_waits_for_a_concurrent_kill_switch_and_sees_it(settings, maker, db, world):
    async with await psycopg.AsyncConnection.connect(libpq_url(settings.database_url)) as psql:
        await psql.execute("UPDATE ops_policy SET autopatch_enabled = false WHERE id = 1")
        evaluation = asyncio.create_task(gate(maker, world.action))
        await wait_for_lock_wait(db, "FOR SHARE")
        assert not evaluation.done()
        await psql.commit()
        result = await asyncio.wait_for(evaluation, 10)
    assert (result.allowed, result.reasons) == (False, (KILL_SWITCH,))


async def test_kill_switch_waits_for_a_transaction_the_gate_allowed(settings, maker, db, world):
    async with await psycopg.AsyncConnection.connect(
        libpq_url(settings.database_url), autocommit=True
    ) as psql:
        async with maker() as session, session.begin():
            assert (await evaluate(session, world.action)).allowed
            kill = asyncio.create_task(
                psql.execute("UPDATE ops_policy SET autopatch_enabled = false WHERE id = 1")
            )
            await wait_for_lock_wait(db, "UPDATE ops_policy")
            assert not kill.done()
        await asyncio.wait_for(kill, 10)
    assert (await gate(maker, world.action)).reasons == (KILL_SWITCH,)


async def test_naive_now_is_refused(maker, world):
    with pytest.raises(ValueError, match="timezone-aware"):
        await gate(maker, world.action, now=datetime(2026, 1, 1))
