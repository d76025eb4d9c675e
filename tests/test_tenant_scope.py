"""Tenant-scoped ops users (issue 10, item 9): a user limited to some tenants sees and acts on
those tenants only, in the ops API and in the dashboard (another tenant's incident,
installation, attempt or window is a 404, lists and counts leave them out, fleet incidents are
for users of every tenant); an admin is never scoped; `selfheal user add --tenant` end to end;
and the audit log records the tenant of each action."""

from __future__ import annotations

import os
import uuid
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from app.core.errors import Invalid, Refused
from app.ops import security
from tests.support.api import serve
from tests.support.cli import one_json_object, runner
from tests.support.dashboard import post_form, sign_in
from tests.support.databases import libpq
from tests.support.personas import Persona, make_user
from tests.support.plugins import Plugin, send_heartbeat
from tests.support.reads import add_attempt, add_window, reading
from tests.support.settings import TEST_SECRET_KEY

PENDING = {
    "action": "patch",
    "to_version": "1.2.3",
    "from_version": "1.2.2",
    "automatic": True,
    "requested_by": "worker",
    "source": "sira",
    "confidence": 0.9,
    "comment": None,
}


def waiting_incident(db, plugin: Plugin) -> str:
    """An incident of `plugin` waiting for approval of PENDING, as the loop leaves one."""
    row = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity, status, status_reason, pending_action)"
        " VALUES (%s, %s, %s, '1.2.2', 'error_spike', 'high', 'awaiting_approval',"
        "  'waiting: 2 more approvals needed', %s::jsonb) RETURNING id::text",
        (plugin.id, plugin.tenant, plugin.name, orjson.dumps(PENDING).decode()),
    ).fetchone()
    assert row is not None
    return str(row[0])


def fleet_incident(db, *members: str) -> str:
    """A fleet incident (no installation, no tenant) grouping `members`."""
    row = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity, status) VALUES (NULL, NULL, 'payments', '1.2.2', 'error_spike',"
        " 'high', 'escalated') RETURNING id::text"
    ).fetchone()
    assert row is not None
    for member in members:
        db.execute(
            "UPDATE plugin_incidents SET fleet_incident_id = %s WHERE id = %s", (row[0], member)
        )
    return str(row[0])


class World:
    """Two tenants' installations with an incident, an attempt and a window each, a fleet
    incident over both, and a user of every tenant beside one limited to merchant-1."""

    def __init__(self, db, mine: Plugin, theirs: Plugin) -> None:
        self.mine, self.theirs = mine, theirs
        self.my_incident = waiting_incident(db, mine)
        self.their_incident = waiting_incident(db, theirs)
        self.fleet = fleet_incident(db, self.my_incident, self.their_incident)
        self.my_attempt = add_attempt(db, incident_id=None, installation_id=mine.id)
        self.their_attempt = add_attempt(db, incident_id=None, installation_id=theirs.id)
        self.my_window = add_window(db, tenant=mine.tenant, reason="mine")
        self.their_window = add_window(db, installation_id=theirs.id, reason="theirs")


@pytest.fixture
async def world(db, plugin, other_plugin) -> World:
    assert (plugin.tenant, other_plugin.tenant) == ("merchant-1", "merchant-2")
    return World(db, plugin, other_plugin)


@pytest.fixture
async def scoped(settings, world) -> Persona:
    """An operator limited to merchant-1."""
    return await make_user(settings, "sam", "operator", tenants=["merchant-1"])


@pytest.fixture
async def scoped_viewer(settings, world) -> Persona:
    return await make_user(settings, "sue", "viewer", tenants=["merchant-1"])


def ids(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {item["id"] for item in response.json()["items"]}


async def action_key(client: httpx.AsyncClient, incident: str, persona: Persona) -> str:
    """The key of the action the incident waits for, as `persona` reads it."""
    detail = await client.get(f"/api/ops/plugin-incidents/{incident}", headers=persona.auth)
    assert detail.status_code == 200, detail.text
    key = detail.json()["pending_action_key"]
    assert isinstance(key, str)
    return key


def audit_rows(db, entity: str) -> list[tuple[Any, ...]]:
    """(action, actor, tenant_id) of the audit rows about `entity`, oldest first."""
    rows = db.execute(
        "SELECT action, actor, tenant_id FROM audit_log WHERE entity = %s ORDER BY id", (entity,)
    ).fetchall()
    return [tuple(row) for row in rows]


# --- the ops API ---------------------------------------------------------------------------------


async def test_scoped_user_gets_404_for_another_tenants_incident_and_for_a_fleet_incident(
    client, world, scoped, operator
):
    mine = await client.get(f"/api/ops/plugin-incidents/{world.my_incident}", headers=scoped.auth)
    assert mine.status_code == 200, mine.text
    assert mine.json()["tenant_id"] == "merchant-1"
    for hidden in (world.their_incident, world.fleet):
        response = await client.get(f"/api/ops/plugin-incidents/{hidden}", headers=scoped.auth)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"] == "no such incident"
        # Exactly what an id that does not exist gets: nothing says it exists.
        unknown = await client.get(f"/api/ops/plugin-incidents/{uuid.uuid4()}", headers=scoped.auth)
        assert unknown.json() == response.json()
    # A user of every tenant still sees both, and the fleet incident with its members.
    fleet = await client.get(f"/api/ops/plugin-incidents/{world.fleet}", headers=operator.auth)
    assert {m["id"] for m in fleet.json()["members"]} == {world.my_incident, world.their_incident}


async def test_scoped_lists_and_kpis_leave_other_tenants_out(client, db, world, scoped, viewer):
    listed = await client.get("/api/ops/plugin-incidents", headers=scoped.auth)
    assert ids(listed) == {world.my_incident}
    # Asking for the other tenant by name finds nothing.
    other = await client.get(
        "/api/ops/plugin-incidents", params={"tenant": "merchant-2"}, headers=scoped.auth
    )
    assert ids(other) == set()
    everything = await client.get("/api/ops/plugin-incidents", headers=viewer.auth)
    assert ids(everything) == {world.my_incident, world.their_incident, world.fleet}

    attempts = await client.get("/api/ops/autopatch-attempts", headers=scoped.auth)
    assert ids(attempts) == {world.my_attempt}
    assert ids(await client.get("/api/ops/autopatch-attempts", headers=viewer.auth)) == {
        world.my_attempt,
        world.their_attempt,
    }

    kpis = (await client.get("/api/ops/kpis", headers=scoped.auth)).json()
    assert kpis["incidents"] == 1
    assert kpis["attempts"] == 1
    assert kpis["incidents_by_severity_24h"] == {"high": 1}
    every = (await client.get("/api/ops/kpis", headers=viewer.auth)).json()
    assert every["incidents"] == 3
    assert every["attempts"] == 2


async def test_scoped_operator_cannot_approve_or_act_on_another_tenants_incident(
    client, db, world, scoped
):
    before = db.execute(
        "SELECT status, pending_action FROM plugin_incidents WHERE id = %s",
        (world.their_incident,),
    ).fetchone()
    for path, body in (
        (
            f"/api/ops/plugin-incidents/{world.their_incident}/approve",
            {"comment": "x", "action_key": "a" * 64},
        ),
        (f"/api/ops/plugin-incidents/{world.their_incident}/manual-action", {"action": "resolve"}),
        (f"/api/ops/plugin-incidents/{world.fleet}/manual-action", {"action": "ignore"}),
        (f"/api/ops/plugin-incidents/{world.fleet}/approve", {"action_key": "a" * 64}),
    ):
        response = await client.post(path, json=body, headers=scoped.auth)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["message"] == "no such incident"
    after = db.execute(
        "SELECT status, pending_action FROM plugin_incidents WHERE id = %s",
        (world.their_incident,),
    ).fetchone()
    assert after == before
    assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 0
    fleet_status = db.execute(
        "SELECT status FROM plugin_incidents WHERE id = %s", (world.fleet,)
    ).fetchone()
    assert fleet_status == ("escalated",)

    # Their own tenant's incident: they act as any operator does.
    mine = await client.post(
        f"/api/ops/plugin-incidents/{world.my_incident}/approve",
        json={
            "comment": "looks right",
            "action_key": await action_key(client, world.my_incident, scoped),
        },
        headers=scoped.auth,
    )
    assert mine.status_code == 200, mine.text
    assert mine.json()["approvals"] == 1


async def test_scoped_users_never_change_the_policy_and_see_only_their_whitelist(
    client, db, world, scoped, admin
):
    db.execute(
        'UPDATE ops_policy SET autopatch_whitelist = \'["merchant-1", "merchant-2"]\'::jsonb'
    )
    for body in ({"autopatch_enabled": True}, {"autopatch_whitelist": ["merchant-1"]}):
        response = await client.put("/api/ops/policy", json=body, headers=scoped.auth)
        assert response.status_code == 403, response.text
    row = db.execute("SELECT autopatch_enabled, autopatch_whitelist FROM ops_policy").fetchone()
    assert row == (False, ["merchant-1", "merchant-2"])
    seen = (await client.get("/api/ops/policy", headers=scoped.auth)).json()
    assert seen["autopatch_whitelist"] == ["merchant-1"]
    assert (await client.get("/api/ops/policy", headers=admin.auth)).json()[
        "autopatch_whitelist"
    ] == ["merchant-1", "merchant-2"]


async def test_scoped_maintenance_windows_are_their_tenants_only(client, db, world, scoped):
    listed = await client.get("/api/ops/maintenance-windows", headers=scoped.auth)
    assert ids(listed) == {world.my_window}
    for body in (
        {"tenant_id": "merchant-2", "duration_s": 600, "reason": "x"},
        {"installation_id": world.theirs.id, "duration_s": 600, "reason": "x"},
    ):
        response = await client.post("/api/ops/maintenance-windows", json=body, headers=scoped.auth)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"].startswith("no such ")
    ended = await client.post(
        f"/api/ops/maintenance-windows/{world.their_window}/end", headers=scoped.auth
    )
    assert ended.status_code == 404, ended.text
    assert db.execute("SELECT count(*) FROM maintenance_windows").fetchone()[0] == 2
    assert db.execute(
        "SELECT ends_at > now() FROM maintenance_windows WHERE id = %s", (world.their_window,)
    ).fetchone() == (True,)
    created = await client.post(
        "/api/ops/maintenance-windows",
        json={"installation_id": world.mine.id, "duration_s": 600, "reason": "deploy"},
        headers=scoped.auth,
    )
    assert created.status_code == 201, created.text


# --- who can be scoped -----------------------------------------------------------------------------


async def test_an_admin_is_never_scoped(settings, db, world, scoped, admin):
    with pytest.raises(Invalid, match="an admin sees every tenant"):
        await make_user(settings, "root2", "admin", tenants=["merchant-1"])
    with pytest.raises(Invalid, match="no such tenant: merchant-9"):
        await make_user(settings, "x", "viewer", tenants=["merchant-1", "merchant-9"])
    # Not even from psql.
    with pytest.raises(psycopg.errors.CheckViolation, match="ck_ops_users_admin_unscoped"):
        db.execute("UPDATE ops_users SET tenants = '{merchant-1}' WHERE username = 'ada'")
    async with reading(settings) as session:
        by = await security.user_for_token(session, admin.token)
        assert by is not None and by.tenants is None and by.can("admin")
        target = db.execute("SELECT id FROM ops_users WHERE username = 'sam'").fetchone()[0]
        with pytest.raises(Refused, match="limited to tenants merchant-1"):
            await security.change_role(session, by, target, "admin")
        # A scoped user never counts as an admin, whatever its role column says.
        scoped_user = await security.user_for_token(session, scoped.token)
        assert scoped_user is not None and scoped_user.tenants == ("merchant-1",)
        forged = security.OpsUser(scoped_user.id, "sam", "admin", ("merchant-1",))
        assert not forged.can("admin") and forged.can("operator")


# --- the dashboard ---------------------------------------------------------------------------------


async def test_dashboard_shows_a_scoped_user_their_tenants_only(client, db, world, scoped_viewer):
    await sign_in(client, scoped_viewer)
    incidents = await client.get("/ops/incidents")
    assert world.my_incident in incidents.text
    assert world.their_incident not in incidents.text and world.fleet not in incidents.text
    assert (await client.get(f"/ops/incidents/{world.my_incident}")).status_code == 200
    for path in (
        f"/ops/incidents/{world.their_incident}",
        f"/ops/incidents/{world.fleet}",
        f"/ops/attempts/{world.their_attempt}",
        f"/ops/fleet/{world.theirs.id}",
    ):
        page = await client.get(path)
        assert page.status_code == 404, path
        assert "merchant-2" not in page.text
    assert (await client.get(f"/ops/attempts/{world.my_attempt}")).status_code == 200
    assert (await client.get(f"/ops/fleet/{world.mine.id}")).status_code == 200
    attempts = (await client.get("/ops/attempts")).text
    assert world.my_attempt in attempts and world.their_attempt not in attempts
    fleet = (await client.get("/ops/fleet")).text
    assert world.mine.id in fleet and world.theirs.id not in fleet
    assert "merchant-2" not in fleet
    kpis = (await client.get("/ops/kpis")).text
    assert "1 incidents detected in the window" in kpis
    assert "1 attempts executed in the window" in kpis
    policy = (await client.get("/ops/policy")).text
    assert "mine" in policy and "theirs" not in policy


async def test_dashboard_scoped_operator_cannot_act_on_another_tenant_nor_the_policy(
    client, db, world, scoped
):
    csrf = await sign_in(client, scoped)
    approve = await post_form(
        client, f"/ops/incidents/{world.their_incident}/approve", csrf, action_key="a" * 64
    )
    assert approve.status_code == 303
    page = (await client.get(approve.headers["location"])).text
    assert "Not done: no such incident" in page
    snooze = await post_form(
        client, f"/ops/incidents/{world.their_incident}/snooze", csrf, minutes="30"
    )
    assert "Not done: no such incident" in (await client.get(snooze.headers["location"])).text
    act = await post_form(client, f"/ops/incidents/{world.fleet}/act", csrf, action="ignore")
    assert "Not done: no such incident" in (await client.get(act.headers["location"])).text
    end = await post_form(client, f"/ops/policy/windows/{world.their_window}/end", csrf)
    assert "no such maintenance window" in (await client.get(end.headers["location"])).text
    assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM maintenance_windows").fetchone()[0] == 2
    kill = await post_form(
        client, "/ops/policy/kill-switch", csrf, autopatch="on", confirm="ENABLE"
    )
    assert kill.status_code == 403
    assert db.execute("SELECT autopatch_enabled FROM ops_policy").fetchone() == (False,)
    assert (await client.get("/ops/users")).status_code == 403


async def test_dashboard_admin_sets_and_clears_a_users_tenants(settings, db, world, admin, viewer):
    async with serve(settings) as (_, browser):
        csrf = await sign_in(browser, admin)
        page = (await browser.get("/ops/users")).text
        user_id = db.execute("SELECT id::text FROM ops_users WHERE username = 'vera'").fetchone()[0]
        assert f'action="/ops/users/{user_id}/tenants"' in page
        done = await post_form(
            browser, f"/ops/users/{user_id}/tenants", csrf, tenants="merchant-1, merchant-1"
        )
        assert "vera now sees merchant-1." in (await browser.get(done.headers["location"])).text
        assert db.execute("SELECT tenants FROM ops_users WHERE username = 'vera'").fetchone() == (
            ["merchant-1"],
        )
        # From the next request on, vera's token sees merchant-1 only.
        listed = await browser.get("/api/ops/plugin-incidents", headers=viewer.auth)
        assert ids(listed) == {world.my_incident}
        refused = await post_form(browser, f"/ops/users/{user_id}/tenants", csrf, tenants="nope")
        assert (
            "Tenants not changed: no such tenant: nope"
            in (await browser.get(refused.headers["location"])).text
        )
        cleared = await post_form(browser, f"/ops/users/{user_id}/tenants", csrf, tenants="")
        assert (
            "vera now sees every tenant." in (await browser.get(cleared.headers["location"])).text
        )
        assert db.execute("SELECT tenants FROM ops_users WHERE username = 'vera'").fetchone() == (
            None,
        )
        added = await post_form(
            browser, "/ops/users", csrf, username="tina", role="operator", tenants="merchant-2"
        )
        assert added.status_code == 200
        assert "tina (operator, tenants merchant-2) is added" in added.text
    # The scope change is in the audit log, like a role change.
    changes = db.execute(
        "SELECT actor, old -> 'tenants', new -> 'tenants' FROM audit_log"
        " WHERE entity = 'ops_users' AND action = 'update' ORDER BY id"
    ).fetchall()
    assert changes == [
        ("user:ada", None, ["merchant-1"]),
        ("user:ada", ["merchant-1"], None),
    ]


# --- the command line ------------------------------------------------------------------------------


async def test_user_add_with_tenants_end_to_end(settings, tmp_path, world):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")},
        "DATABASE_URL": libpq(settings.database_url),
        "REDIS_URL": settings.redis_url,
        "SELFHEAL_REDIS_PREFIX": settings.redis_prefix,
        "SELFHEAL_SECRET_KEY": TEST_SECRET_KEY,
        "SELFHEAL_DATA_DIR": "selfheal-data",
    }
    run = runner(env, tmp_path)
    result = run("user", "add", "carol", "--role", "operator", "--tenant", "merchant-1", "--json")
    assert result.returncode == 0, result.stderr
    data = one_json_object(result.stdout)
    assert data["tenants"] == ["merchant-1"]
    async with serve(settings) as (_, client):
        auth = {"Authorization": f"Bearer {data['token']}"}
        assert ids(await client.get("/api/ops/plugin-incidents", headers=auth)) == {
            world.my_incident
        }
        their = await client.get(f"/api/ops/plugin-incidents/{world.their_incident}", headers=auth)
        assert their.status_code == 404

    admin = run("user", "add", "root", "--role", "admin", "--tenant", "merchant-1")
    assert admin.returncode == 2
    assert "an admin sees every tenant" in admin.stderr
    unknown = run("user", "add", "dave", "--tenant", "merchant-1", "--tenant", "merchant-7")
    assert unknown.returncode == 2
    assert "no such tenant: merchant-7" in unknown.stderr
    everyone = run("user", "add", "erin", "--json")
    assert everyone.returncode == 0, everyone.stderr
    assert one_json_object(everyone.stdout)["tenants"] is None


# --- the audit log ---------------------------------------------------------------------------------


async def test_audit_rows_of_actions_carry_their_tenant(client, db, world, operator, admin):
    # A vote, a manual action, a window: each lands in the audit log with its tenant.
    vote = await client.post(
        f"/api/ops/plugin-incidents/{world.their_incident}/approve",
        json={
            "comment": "ok",
            "action_key": await action_key(client, world.their_incident, operator),
        },
        headers=operator.auth,
    )
    assert vote.status_code == 200, vote.text
    assert audit_rows(db, "approvals") == [("insert", "user:otto", "merchant-2")]

    resolved = await client.post(
        f"/api/ops/plugin-incidents/{world.my_incident}/manual-action",
        json={"action": "resolve", "comment": "fixed by hand"},
        headers=operator.auth,
    )
    assert resolved.status_code == 200, resolved.text
    assert audit_rows(db, "plugin_incidents") == [("update", "user:otto", "merchant-1")]

    window = await client.post(
        "/api/ops/maintenance-windows",
        json={"installation_id": world.theirs.id, "duration_s": 600, "reason": "deploy"},
        headers=operator.auth,
    )
    assert window.status_code == 201, window.text
    assert audit_rows(db, "maintenance_windows")[-1] == ("insert", "user:otto", "merchant-2")

    # A global change has no tenant.
    policy = await client.put("/api/ops/policy", json={"canary_percent": 50}, headers=admin.auth)
    assert policy.status_code == 200, policy.text
    assert audit_rows(db, "ops_policy")[-1] == ("update", "user:ada", None)

    # Registering put the tenants and installations in it, with their tenant.
    assert ("insert", None, "merchant-2") in audit_rows(db, "tenants")
    assert ("insert", None, "merchant-2") in audit_rows(db, "merchant_plugins")


async def test_heartbeats_add_nothing_to_the_audit_log(client, db, world):
    # Ingest rewrites the installation's row on every heartbeat: that is not an ops action.
    before = db.execute("SELECT count(*) FROM audit_log").fetchone()
    for _ in range(3):
        response = await send_heartbeat(client, world.mine)
        assert response.status_code == 200, response.text
    assert db.execute("SELECT count(*) FROM audit_log").fetchone() == before
    # Disabling an installation is one.
    db.execute("UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (world.mine.id,))
    assert audit_rows(db, "merchant_plugins")[-1] == ("update", None, "merchant-1")


async def test_the_loops_own_incident_moves_are_not_in_the_audit_log(db, world):
    # The healing loop moves incidents without naming an ops user: its record is the attempts'
    # event log; the audit log keeps ops users' actions.
    db.execute(
        "UPDATE plugin_incidents SET status = 'deciding', pending_action = NULL WHERE id = %s",
        (world.my_incident,),
    )
    assert audit_rows(db, "plugin_incidents") == []
    db.execute("BEGIN")
    db.execute("SELECT set_config('selfheal.actor', 'user:otto', true)")
    db.execute(
        "UPDATE plugin_incidents SET status = 'escalated' WHERE id = %s", (world.my_incident,)
    )
    db.execute("COMMIT")
    assert audit_rows(db, "plugin_incidents") == [("update", "user:otto", "merchant-1")]
