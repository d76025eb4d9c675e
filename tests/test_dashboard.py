"""The ops dashboard (issue 9) through httpx against the app: sign-in and its sessions (cookie
flags, fixation, logout, timeouts, slowed failures), CSRF on every form, roles, the incident
pages and their forms (approve bound to the action seen, manual actions), the policy page and
its kill switch, and no secret on any page."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from app.core.settings import Settings
from tests.support.api import serve
from tests.support.dashboard import (
    SESSION_COOKIE,
    csrf_of,
    post_form,
    sign_in,
    try_sign_in,
)
from tests.support.personas import make_user
from tests.support.plugins import Plugin
from tests.support.ports import free_port

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


@pytest.fixture
async def browser(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A second client on its own app instance (its own cookie jar)."""
    async with serve(settings) as (_, http):
        yield http


def waiting_incident(db, plugin: Plugin, pending: dict[str, Any] | None = None) -> str:
    """An incident waiting for approval of `pending` (as the healing loop leaves one)."""
    row = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity, status, status_reason, pending_action, telemetry_snapshot)"
        " VALUES (%s, %s, %s, '1.2.2', 'error_spike', 'high', 'awaiting_approval',"
        "  'waiting: 1 more approval needed', %s::jsonb, %s::jsonb) RETURNING id::text",
        (
            plugin.id,
            plugin.tenant,
            plugin.name,
            orjson.dumps(pending or PENDING).decode(),
            orjson.dumps({"error_rate": 0.31, "requests": 1200}).decode(),
        ),
    ).fetchone()
    assert row is not None
    return str(row[0])


def session_rows(db) -> list[tuple[Any, ...]]:
    return db.execute("SELECT id_hash, user_id, last_seen_at FROM ops_sessions").fetchall()


def autopatch_enabled(db) -> bool:
    return bool(db.execute("SELECT autopatch_enabled FROM ops_policy").fetchone()[0])


async def flash_after(client: httpx.AsyncClient, response: httpx.Response) -> str:
    """The page a form's 303 leads to (where its message shows)."""
    assert response.status_code == 303, response.text
    page = await client.get(response.headers["location"])
    assert page.status_code == 200, page.text
    return page.text


# --- sign-in ---------------------------------------------------------------------------------


async def test_sign_in_with_the_password_from_user_add_lands_on_the_incidents(client, operator):
    response = await try_sign_in(client, operator.username, operator.password)
    assert response.status_code == 303
    assert response.headers["location"] == "/ops/incidents"
    page = await client.get("/ops/incidents")
    assert page.status_code == 200
    assert "Signed in as <strong>otto</strong> (operator)" in page.text
    assert 'action="/ops/logout"' in page.text


async def test_wrong_password_and_unknown_user_are_refused_alike(client, db, operator):
    for username, password in ((operator.username, "wrong"), ("nobody", operator.password)):
        response = await try_sign_in(client, username, password)
        assert response.status_code == 401
        assert "Wrong user name or password." in response.text
        assert SESSION_COOKIE not in response.cookies
    assert session_rows(db) == []
    assert (await client.get("/ops/incidents")).status_code == 303


async def test_a_disabled_user_cannot_sign_in(client, db, operator):
    db.execute("UPDATE ops_users SET disabled_at = now() WHERE username = 'otto'")
    response = await try_sign_in(client, operator.username, operator.password)
    assert response.status_code == 401


async def test_pages_without_a_session_go_to_the_sign_in_page_and_back(client, operator):
    response = await client.get("/ops/policy")
    assert response.status_code == 303
    assert response.headers["location"] == "/ops/login?next=%2Fops%2Fpolicy"
    signed = await try_sign_in(
        client, operator.username, operator.password, next_path="/ops/policy"
    )
    assert signed.headers["location"] == "/ops/policy"
    # Only a dashboard path: no open redirect.
    await client.post(
        "/ops/logout", data={"csrf_token": csrf_of((await client.get("/ops/policy")).text)}
    )
    signed = await try_sign_in(
        client, operator.username, operator.password, next_path="//evil.example/ops/"
    )
    assert signed.headers["location"] == "/ops/incidents"


async def test_session_cookie_is_httponly_samesite_lax_and_secure_outside_dev(settings, operator):
    for overrides, secure in (
        ({}, False),
        ({"cookie_secure": True}, True),
        ({"env": "prod"}, True),
    ):
        async with serve(settings.model_copy(update=overrides)) as (app, _):
            # Over https, as a browser would send Secure cookies back.
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="https://selfheal.test"
            ) as http:
                response = await try_sign_in(http, operator.username, operator.password)
            assert response.status_code == 303, response.text
            [cookie] = [
                value
                for value in response.headers.get_list("set-cookie")
                if value.startswith(f"{SESSION_COOKIE}=")
            ]
            attributes = {part.strip().lower() for part in cookie.split(";")}
            assert "httponly" in attributes
            assert "samesite=lax" in attributes
            assert "path=/ops" in attributes
            assert ("secure" in attributes) is secure, (overrides, cookie)


async def test_only_a_hash_of_the_session_id_is_stored(client, db, operator):
    response = await try_sign_in(client, operator.username, operator.password)
    session_id = response.cookies[SESSION_COOKIE]
    [(id_hash, _, _)] = session_rows(db)
    assert bytes(id_hash) == hashlib.sha256(session_id.encode()).digest()
    assert session_id.encode() not in bytes(id_hash)


async def test_a_new_session_id_at_every_sign_in_and_the_old_one_ends(
    client, browser, db, operator
):
    # A cookie planted before sign-in (session fixation) is never adopted.
    client.cookies.set(SESSION_COOKIE, "planted-by-an-attacker", path="/ops")
    first = await try_sign_in(client, operator.username, operator.password)
    first_id = first.cookies[SESSION_COOKIE]
    assert first_id != "planted-by-an-attacker"
    second = await try_sign_in(client, operator.username, operator.password)
    second_id = second.cookies[SESSION_COOKIE]
    assert second_id != first_id
    # The session the browser came with ended at the second sign-in.
    assert len(session_rows(db)) == 1
    browser.cookies.set(SESSION_COOKIE, first_id, path="/ops")
    assert (await browser.get("/ops/incidents")).status_code == 303


async def test_logout_ends_the_session_and_the_old_cookie_is_refused(client, browser, db, operator):
    csrf = await sign_in(client, operator)
    session_id = client.cookies[SESSION_COOKIE]
    response = await post_form(client, "/ops/logout", csrf)
    assert response.status_code == 303
    assert response.headers["location"] == "/ops/login?notice=signed-out"
    assert session_rows(db) == []
    browser.cookies.set(SESSION_COOKIE, session_id, path="/ops")
    refused = await browser.get("/ops/incidents")
    assert refused.status_code == 303
    assert refused.headers["location"].startswith("/ops/login?")
    again = await post_form(browser, "/ops/logout", csrf)
    assert again.status_code == 303 and again.headers["location"].startswith("/ops/login")


async def test_idle_and_absolute_timeouts_end_a_session(settings, db, operator):
    async with serve(
        settings.model_copy(update={"session_idle_s": 600, "session_max_s": 3600})
    ) as (
        _,
        http,
    ):
        await sign_in(http, operator)
        db.execute("UPDATE ops_sessions SET last_seen_at = now() - interval '11 minutes'")
        response = await http.get("/ops/incidents")
        assert response.status_code == 303
        assert "notice=expired" in response.headers["location"]
        assert session_rows(db) == []

        await sign_in(http, operator)
        db.execute("UPDATE ops_sessions SET created_at = now() - interval '61 minutes'")
        assert (await http.get("/ops/incidents")).status_code == 303
        assert session_rows(db) == []


async def test_a_pages_own_refresh_is_not_activity(client, db, operator):
    await sign_in(client, operator)
    db.execute("UPDATE ops_sessions SET last_seen_at = now() - interval '5 minutes'")
    [(_, _, before)] = session_rows(db)
    assert (await client.get("/ops/incidents?refresh=1")).status_code == 200
    assert session_rows(db)[0][2] == before
    assert (await client.get("/ops/incidents")).status_code == 200
    assert session_rows(db)[0][2] > before


async def test_failed_sign_ins_are_slowed_per_account(settings, operator, admin):
    async with serve(settings.model_copy(update={"login_failures_per_account": 3})) as (_, http):
        for _ in range(3):
            assert (await try_sign_in(http, operator.username, "wrong")).status_code == 401
        # Locked: even the right password waits, and says so.
        response = await try_sign_in(http, operator.username, operator.password)
        assert response.status_code == 429
        assert "Too many failed sign-ins" in response.text
        assert int(response.headers["retry-after"]) > 0
        # Another account from the same address is not locked by these.
        assert (await try_sign_in(http, admin.username, admin.password)).status_code == 303


async def test_failed_sign_ins_are_slowed_per_address(settings, operator):
    async with serve(settings.model_copy(update={"login_failures_per_address": 3})) as (_, http):
        for name in ("a", "b", "c"):
            assert (await try_sign_in(http, name, "wrong")).status_code == 401
        response = await try_sign_in(http, operator.username, operator.password)
        assert response.status_code == 429


async def test_a_successful_sign_in_resets_the_accounts_count(settings, operator):
    async with serve(settings.model_copy(update={"login_failures_per_account": 3})) as (_, http):
        for _ in range(2):
            await try_sign_in(http, operator.username, "wrong")
        assert (await try_sign_in(http, operator.username, operator.password)).status_code == 303
        for _ in range(2):
            await try_sign_in(http, operator.username, "wrong")
        assert (await try_sign_in(http, operator.username, operator.password)).status_code == 303


async def test_sign_in_without_redis_is_refused_with_a_503_that_says_why(settings, operator):
    away = f"redis://127.0.0.1:{free_port()}/0"
    async with serve(settings.model_copy(update={"redis_url": away})) as (_, http):
        response = await try_sign_in(http, operator.username, operator.password)
        assert response.status_code == 503
        assert "the failed sign-in counter (Redis) cannot be reached" in response.text
        assert SESSION_COOKIE not in response.cookies


# --- CSRF --------------------------------------------------------------------------------------


async def test_every_form_without_or_with_a_wrong_csrf_token_is_403(client, db, plugin, admin):
    incident = waiting_incident(db, plugin)
    csrf = await sign_in(client, admin)
    forms = [
        (f"/ops/incidents/{incident}/approve", {"action_key": "0" * 64}),
        (f"/ops/incidents/{incident}/act", {"action": "resolve"}),
        (f"/ops/incidents/{incident}/snooze", {"minutes": "30"}),
        ("/ops/policy", {"canary_percent": "50"}),
        ("/ops/policy/kill-switch", {"autopatch": "on", "confirm": "ENABLE"}),
        ("/ops/logout", {}),
    ]
    for path, fields in forms:
        for token in (None, "wrong", csrf[:-1]):
            response = await post_form(client, path, token, **fields)
            assert response.status_code == 403, (path, token)
            assert "security token" in response.text
    assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 0
    assert db.execute("SELECT status FROM plugin_incidents").fetchone()[0] == "awaiting_approval"
    assert db.execute("SELECT canary_percent FROM ops_policy").fetchone()[0] != 50
    assert not autopatch_enabled(db)
    assert db.execute("SELECT count(*) FROM maintenance_windows").fetchone()[0] == 0
    assert len(session_rows(db)) == 1  # logout did not happen


async def test_the_sign_in_form_needs_its_csrf_token(client, operator):
    await client.get("/ops/login")
    response = await client.post(
        "/ops/login", data={"username": operator.username, "password": operator.password}
    )
    assert response.status_code == 403
    response = await client.post(
        "/ops/login",
        data={"csrf_token": "forged", "username": operator.username, "password": operator.password},
    )
    assert response.status_code == 403


async def test_a_csrf_token_belongs_to_its_session(client, browser, db, plugin, operator, admin):
    incident = waiting_incident(db, plugin)
    stolen = await sign_in(client, operator)
    await sign_in(browser, admin)
    response = await post_form(browser, f"/ops/incidents/{incident}/act", stolen, action="resolve")
    assert response.status_code == 403


# --- roles -------------------------------------------------------------------------------------


async def test_viewer_reads_but_cannot_approve_act_or_change_the_policy(client, db, plugin, viewer):
    incident = waiting_incident(db, plugin)
    csrf = await sign_in(client, viewer)
    page = await client.get(f"/ops/incidents/{incident}")
    assert page.status_code == 200
    assert "/approve" not in page.text and "/act" not in page.text
    policy = await client.get("/ops/policy")
    assert policy.status_code == 200 and "/ops/policy/kill-switch" not in policy.text
    key = db.execute("SELECT count(*) FROM approvals").fetchone()[0]
    for path, fields in (
        (f"/ops/incidents/{incident}/approve", {"action_key": "a" * 64}),
        (f"/ops/incidents/{incident}/act", {"action": "resolve"}),
        (f"/ops/incidents/{incident}/snooze", {"minutes": "30"}),
        ("/ops/policy", {"canary_percent": "50"}),
        ("/ops/policy/kill-switch", {"autopatch": "on", "confirm": "ENABLE"}),
    ):
        response = await post_form(client, path, csrf, **fields)
        assert response.status_code == 403, path
        assert "needs the" in response.text
    assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == key
    assert db.execute("SELECT status FROM plugin_incidents").fetchone()[0] == "awaiting_approval"
    assert not autopatch_enabled(db)


async def test_operator_acts_but_cannot_change_the_policy(client, db, operator):
    csrf = await sign_in(client, operator)
    policy = await client.get("/ops/policy")
    assert "/ops/policy/kill-switch" not in policy.text
    for path, fields in (
        ("/ops/policy", {"canary_percent": "50"}),
        ("/ops/policy/kill-switch", {"autopatch": "on", "confirm": "ENABLE"}),
    ):
        response = await post_form(client, path, csrf, **fields)
        assert response.status_code == 403
        assert "needs the admin role" in response.text
    assert not autopatch_enabled(db)


# --- incidents ---------------------------------------------------------------------------------


async def test_incident_list_filters_counts_and_what_happens_next(client, db, plugin, viewer):
    waiting = waiting_incident(db, plugin)
    db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, type, severity,"
        " status, status_reason, resolved_at) VALUES (%s, %s, %s, 'crash_loop', 'low',"
        " 'resolved', 'healthy again', now())",
        (plugin.id, plugin.tenant, plugin.name),
    )
    await sign_in(client, viewer)
    page = (await client.get("/ops/incidents")).text
    assert f'href="/ops/incidents/{waiting}"' in page
    assert "Waiting for operators&#39; approval: 1 more approval needed" in page
    assert "Nothing more: resolved (healthy again)" in page
    # Badges say it in words as well as colour.
    assert '<span class="badge sev-high">high</span>' in page
    assert '<span class="badge st-awaiting_approval">awaiting approval</span>' in page
    assert 'http-equiv="refresh"' in page and "refresh=1" in page
    high = (await client.get("/ops/incidents", params={"severity": "high"})).text
    assert waiting in high and "healthy again" not in high
    # Counts by severity ignore the severity filter (they say what each would show).
    assert '<span class="badge sev-low">low</span> <strong>1</strong>' in high
    assert '<span class="badge sev-high">high</span> <strong>1</strong>' in high
    crash = (await client.get("/ops/incidents", params={"type": "crash_loop"})).text
    assert waiting not in crash
    nobody = (await client.get("/ops/incidents", params={"tenant": "nobody"})).text
    assert "No incident matches." in nobody
    bad = await client.get("/ops/incidents", params={"cursor": "junk", "severity": "bogus"})
    assert bad.status_code == 200 and "cursor is not one" in bad.text


async def test_incident_list_pages_with_the_apis_cursor(client, db, plugin, viewer):
    db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, type, severity,"
        " status, detected_at) SELECT %s, %s, %s, 'error_spike', 'medium', 'resolved',"
        " now() - make_interval(secs => n) FROM generate_series(1, 55) n",
        (plugin.id, plugin.tenant, plugin.name),
    )
    await sign_in(client, viewer)
    first = (await client.get("/ops/incidents")).text
    assert first.count('<tr>\n    <td><a href="/ops/incidents/') == 50
    assert "Next page" in first
    href = first.split('">Next page</a>')[0].rsplit('href="', 1)[1].replace("&amp;", "&")
    second = (await client.get("/ops/incidents" + href)).text
    assert second.count('<tr>\n    <td><a href="/ops/incidents/') == 5
    assert "Next page" not in second and "First page" in second


async def test_incident_page_shows_telemetry_decision_pending_action_and_timeline(
    client, db, plugin, viewer
):
    incident = waiting_incident(db, plugin)
    db.execute(
        "UPDATE plugin_incidents SET decided_at = now(), sira_decision = %s::jsonb",
        (
            orjson.dumps(
                {
                    "action": "patch",
                    "patch_version": "1.2.3",
                    "confidence": 0.9,
                    "explanation": "the fix for this error",
                    "source": "fallback",
                    "rule": None,
                    "fallback_reason": "decision service unavailable",
                }
            ).decode(),
        ),
    )
    await sign_in(client, viewer)
    page = (await client.get(f"/ops/incidents/{incident}")).text
    assert "error_rate" in page and "0.31" in page
    assert '<span class="badge src-fallback">fallback</span>' in page
    assert "decision service unavailable" in page
    assert "patch from 1.2.2 to <strong>1.2.3</strong>" in page
    assert "decided (fallback): patch 1.2.3, confidence 0.9" in page
    assert (await client.get(f"/ops/incidents/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/ops/incidents/not-a-uuid")).status_code == 404


async def test_approve_through_the_form_with_the_key_seen(client, db, plugin, operator):
    incident = waiting_incident(db, plugin)
    await sign_in(client, operator)
    page = (await client.get(f"/ops/incidents/{incident}")).text
    key = page.split('name="action_key" value="', 1)[1].split('"', 1)[0]
    assert len(key) == 64
    response = await post_form(
        client, f"/ops/incidents/{incident}/approve", csrf_of(page), action_key=key, comment="ok"
    )
    assert response.headers["location"] == f"/ops/incidents/{incident}"
    after = await flash_after(client, response)
    assert "Approved patch to 1.2.3: 1 of" in after
    votes = db.execute(
        "SELECT u.username, a.action_key, a.comment FROM approvals a"
        " JOIN ops_users u ON u.id = a.user_id"
    ).fetchall()
    assert votes == [("otto", key, "ok")]
    # The message shows once.
    assert "Approved patch" not in (await client.get(f"/ops/incidents/{incident}")).text


async def test_approve_with_a_stale_key_is_refused_with_a_message(client, db, plugin, operator):
    incident = waiting_incident(db, plugin)
    await sign_in(client, operator)
    page = (await client.get(f"/ops/incidents/{incident}")).text
    seen = page.split('name="action_key" value="', 1)[1].split('"', 1)[0]
    # Meanwhile the incident came to wait for another action.
    db.execute(
        "UPDATE plugin_incidents SET pending_action = %s::jsonb",
        (orjson.dumps({**PENDING, "to_version": "1.3.0"}).decode(),),
    )
    response = await post_form(
        client, f"/ops/incidents/{incident}/approve", csrf_of(page), action_key=seen
    )
    after = await flash_after(client, response)
    assert "Not done: the action waiting for approval has changed since you saw it" in after
    assert "1.3.0" in after
    assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 0


async def test_approve_without_a_key_is_not_counted(client, db, plugin, operator):
    incident = waiting_incident(db, plugin)
    csrf = await sign_in(client, operator)
    response = await post_form(client, f"/ops/incidents/{incident}/approve", csrf)
    assert "Not done" in await flash_after(client, response)
    assert db.execute("SELECT count(*) FROM approvals").fetchone()[0] == 0


async def test_manual_actions_through_the_form_name_the_user(client, db, plugin, operator):
    incident = waiting_incident(db, plugin)
    csrf = await sign_in(client, operator)
    bad = await post_form(client, f"/ops/incidents/{incident}/act", csrf, action="explode")
    assert "Not done: action:" in await flash_after(client, bad)
    missing = await post_form(
        client, f"/ops/incidents/{incident}/act", csrf, action="patch", patch_version="9.9.9"
    )
    assert "Not done: no signed release of payments 9.9.9" in await flash_after(client, missing)
    response = await post_form(
        client, f"/ops/incidents/{incident}/act", csrf, action="resolve", comment="fixed by hand"
    )
    assert "Done: resolve; the incident is now resolved." in await flash_after(client, response)
    status, reason = db.execute("SELECT status, status_reason FROM plugin_incidents").fetchone()
    assert status == "resolved"
    assert reason == "resolve by user:otto (fixed by hand)"
    closed = await post_form(client, f"/ops/incidents/{incident}/act", csrf, action="escalate")
    assert "Not done: incident is resolved; it is closed" in await flash_after(client, closed)


async def test_two_operators_reach_the_quorum_through_the_form(
    client, browser, db, plugin, operator, settings
):
    incident = waiting_incident(db, plugin)
    second = await make_user(settings, "olga", "operator")
    for http, persona, expected in ((client, operator, "1 of 2"), (browser, second, "2 of 2")):
        await sign_in(http, persona)
        page = (await http.get(f"/ops/incidents/{incident}")).text
        key = page.split('name="action_key" value="', 1)[1].split('"', 1)[0]
        response = await post_form(
            http, f"/ops/incidents/{incident}/approve", csrf_of(page), action_key=key
        )
        assert f"Approved patch to 1.2.3: {expected} approvals." in await flash_after(
            http, response
        )
    voters = db.execute(
        "SELECT u.username FROM approvals a JOIN ops_users u ON u.id = a.user_id ORDER BY 1"
    ).fetchall()
    assert voters == [("olga",), ("otto",)]
    page = (await client.get(f"/ops/incidents/{incident}")).text
    assert "2 valid for this action" in page


async def test_snooze_opens_a_maintenance_window_on_the_installation(client, db, plugin, operator):
    incident = waiting_incident(db, plugin)
    csrf = await sign_in(client, operator)
    bad = await post_form(client, f"/ops/incidents/{incident}/snooze", csrf, minutes="soon")
    assert "Not done: minutes: a whole number is needed" in await flash_after(client, bad)
    response = await post_form(
        client, f"/ops/incidents/{incident}/snooze", csrf, minutes="45", reason="deploying"
    )
    assert "Snoozed: no new incident for this installation until" in await flash_after(
        client, response
    )
    rows = db.execute(
        "SELECT installation_id::text, reason, created_by, round(extract(epoch FROM"
        " ends_at - starts_at)) FROM maintenance_windows"
    ).fetchall()
    assert rows == [(plugin.id, "deploying", "user:otto", 2700)]


# --- policy and kill switch --------------------------------------------------------------------


async def test_kill_switch_needs_its_confirmation_flips_the_policy_and_shows_the_banner(
    client, db, admin
):
    csrf = await sign_in(client, admin)
    banner = "AUTOPATCH IS OFF (kill switch)"
    assert not autopatch_enabled(db)
    assert banner in (await client.get("/ops/incidents")).text
    unconfirmed = await post_form(
        client, "/ops/policy/kill-switch", csrf, autopatch="on", confirm="yes"
    )
    assert "type ENABLE in the confirmation box" in await flash_after(client, unconfirmed)
    assert not autopatch_enabled(db)

    on = await post_form(client, "/ops/policy/kill-switch", csrf, autopatch="on", confirm="ENABLE")
    assert "Autopatch is ON" in await flash_after(client, on)
    assert autopatch_enabled(db)
    assert banner not in (await client.get("/ops/incidents")).text

    policy = (await client.get("/ops/policy")).text
    assert "Type <strong>DISABLE</strong> to confirm" in policy
    off = await post_form(
        client, "/ops/policy/kill-switch", csrf, autopatch="off", confirm="DISABLE"
    )
    assert banner in await flash_after(client, off)
    assert not autopatch_enabled(db)
    for page in ("/ops/incidents", "/ops/policy"):
        assert banner in (await client.get(page)).text
    actors = db.execute(
        "SELECT actor FROM audit_log WHERE entity = 'ops_policy' ORDER BY id"
    ).fetchall()
    assert actors[-2:] == [("user:ada",), ("user:ada",)]


def seen_of(html: str) -> str:
    """The policy version the policy form was rendered from."""
    return html.split('name="seen" value="', 1)[1].split('"', 1)[0]


async def test_admin_changes_the_rules_through_the_policy_form(client, db, admin):
    csrf = await sign_in(client, admin)
    seen = seen_of((await client.get("/ops/policy")).text)
    response = await post_form(
        client,
        "/ops/policy",
        csrf,
        seen=seen,
        autopatch_whitelist="merchant-1, merchant-2\nmerchant-3",
        canary_percent="25",
        min_confidence="0.8",
        approvals_required="2",
        autopatch_max_severity="high",
    )
    after = await flash_after(client, response)
    assert "Policy saved:" in after
    row = db.execute(
        "SELECT autopatch_whitelist, canary_percent, min_confidence, approvals_required,"
        " autopatch_max_severity, updated_by FROM ops_policy"
    ).fetchone()
    assert row[0] == ["merchant-1", "merchant-2", "merchant-3"]
    assert (row[1], float(row[2]), row[3], row[4]) == (25, 0.8, 2, "high")
    assert row[5] == "user:ada"
    seen = seen_of(after)
    bad = await post_form(client, "/ops/policy", csrf, seen=seen, canary_percent="250")
    assert "Not saved: canary_percent" in await flash_after(client, bad)
    nan = await post_form(client, "/ops/policy", csrf, seen=seen, cooldown_s="soon")
    assert "Not saved: cooldown_s: a whole number is needed" in await flash_after(client, nan)
    assert db.execute("SELECT canary_percent FROM ops_policy").fetchone()[0] == 25
    # A change made since the form was loaded (here in psql) is not overwritten unseen.
    db.execute("UPDATE ops_policy SET canary_percent = 30")
    stale = await post_form(client, "/ops/policy", csrf, seen=seen, canary_percent="25")
    assert "Not saved: the policy was changed by" in await flash_after(client, stale)
    assert db.execute("SELECT canary_percent FROM ops_policy").fetchone()[0] == 30


# --- what pages show ---------------------------------------------------------------------------


async def test_no_page_shows_a_plugin_secret_or_a_token(
    client, db, plugin, viewer, operator, admin
):
    incident = waiting_incident(db, plugin)
    secrets = [plugin.secret, viewer.token, operator.token, admin.token]
    await sign_in(client, admin)
    session_id = client.cookies[SESSION_COOKIE]
    pages = [
        "/ops/login",
        "/ops/incidents",
        f"/ops/incidents/{incident}",
        "/ops/policy",
        "/ops/static/style.css",
    ]
    for path in pages:
        response = await client.get(path)
        assert response.status_code == 200, path
        for secret in [*secrets, session_id]:
            assert secret not in response.text, path


async def test_pages_carry_security_headers_and_stay_out_of_the_openapi_document(client, viewer):
    await sign_in(client, viewer)
    for path in ("/ops/login", "/ops/incidents", "/ops/policy"):
        headers = (await client.get(path)).headers
        assert headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
    css = await client.get("/ops/static/style.css")
    assert css.headers["content-type"].startswith("text/css")
    schema = (await client.get("/api/openapi.json")).json()
    assert not [path for path in schema["paths"] if path.startswith("/ops")]
