"""The ops dashboard's reading pages (issue 9) through httpx against the app: KPIs with their
charts and target lines, attempts with their proof, the fleet and one installation, the
releases, and the policy page's maintenance windows and change history; the forms they add
(ending a window) refused without the role or the CSRF token; the admin's user management
page and its forms. Data is put in place as an
operator in psql would (tests/support/reads.py)."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from app.core.settings import Settings
from tests.support.api import serve
from tests.support.dashboard import SESSION_COOKIE, post_form, sign_in, try_sign_in
from tests.support.plugins import heartbeat_body, register, send_heartbeat
from tests.support.reads import (
    add_attempt,
    add_command,
    add_heartbeat,
    add_incident,
    add_release,
    add_vote,
    add_window,
)

SIRA = {"source": "sira", "action": "patch", "confidence": 0.95}
FALLBACK = {"source": "fallback", "action": "patch", "confidence": 0.55}


@pytest.fixture
async def browser(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A second client on its own app instance (its own cookie jar)."""
    async with serve(settings) as (_, http):
        yield http


async def page_of(client: httpx.AsyncClient, path: str) -> str:
    response = await client.get(path)
    assert response.status_code == 200, (path, response.text)
    assert response.headers["cache-control"] == "no-store"
    return response.text


def charts_in(html: str) -> list[str]:
    """The inline SVG charts of a page, each as its text."""
    return re.findall(r'<svg xmlns="http://www.w3.org/2000/svg" class="chart".*?</svg>', html, re.S)


def chart_titled(html: str, title: str) -> str:
    found = [svg for svg in charts_in(html) if f"<title>{title}</title>" in svg]
    assert found, f"no chart titled {title!r}"
    return found[0]


async def flash_after(client: httpx.AsyncClient, response: httpx.Response) -> str:
    """The page a form's 303 leads to (where its message shows)."""
    assert response.status_code == 303, response.text
    page = await client.get(response.headers["location"])
    assert page.status_code == 200, page.text
    return page.text


# --- KPIs ----------------------------------------------------------------------------------


async def test_kpi_page_draws_each_kpi_against_its_target_with_the_numbers(
    client, db, plugin, viewer, operator
):
    def closed(status: str, minutes: float, decision: dict[str, object]) -> str:
        return add_incident(
            db,
            plugin.id,
            status=status,
            severity="high",
            detected_ago_s=3600,
            first_bad_before_s=30,
            resolved_after_s=minutes * 60,
            decision=decision,
            decided_ago_s=3500,
        )

    healed = closed("resolved", 4, SIRA)
    add_attempt(
        db, incident_id=healed, installation_id=plugin.id, status="success", confidence=0.95
    )
    rolled = closed("rolled_back", 6, FALLBACK)
    add_attempt(
        db,
        incident_id=rolled,
        installation_id=plugin.id,
        status="rolled_back",
        source="fallback",
        confidence=0.55,
    )
    closed("resolved", 40, SIRA)  # recovered by itself: not the loop's MTTR
    add_vote(db, healed, operator.username, action_key="k" * 64, after_decision_s=90)
    add_incident(db, plugin.id, severity="critical", detected_ago_s=10)

    await sign_in(client, viewer)
    page = await page_of(client, "/ops/kpis")
    assert 'aria-current="page">KPIs</a>' in page
    assert '<meta http-equiv="refresh" content="60;url=/ops/kpis?days=7&amp;refresh=1">' in page
    # The numbers beside the charts, with the verdict in words.
    assert "<strong>50 %</strong>" in page  # 1 success of 2 attempts
    assert "misses the target" in page
    assert "<strong>30 s</strong>" in page  # MTTD
    assert "<strong>5 min</strong>" in page  # the loop's MTTR: (4 + 6) / 2
    assert "Counted over only the 2 incidents the loop healed" in page
    assert "Over every closed incident: 16.7 min" in page
    # Each KPI as a chart with its target line, and per day with the target line too.
    for title, target in (
        ("Autopatch success rate", "target &gt; 95 %"),
        ("Rollback rate", "target &lt; 2 %"),
        ("MTTD (first bad signal to detection)", "target &lt; 2 min"),
        ("MTTR of the loop (detection to closed)", "target &lt; 10 min"),
    ):
        for chart in (chart_titled(page, title), chart_titled(page, f"{title} per day")):
            assert '<g class="target">' in chart and target in chart, title
    assert "50 % (misses the target)" in chart_titled(page, "Autopatch success rate")
    # Severity over 24 h and 7 days, time to approval, confidence, calibration per source.
    hourly = chart_titled(page, "Incidents per hour, last 24 h")
    assert "critical 1" in hourly and "high 3" in hourly
    assert "Last 7 days: critical <strong>1</strong>, high <strong>3</strong>" in page
    assert "first vote, mean: 90 s" in chart_titled(page, "Time to approval")
    confidence = chart_titled(page, "Decision confidence")
    assert "0.9-1.0: 2" in confidence and "0.5-0.6: 1" in confidence
    sira = chart_titled(page, "Calibration: decision service (sira)")
    fallback = chart_titled(page, "Calibration: fallback (local rules)")
    assert "perfect calibration" in sira and "perfect calibration" in fallback
    assert "sira: predicted 0.95, actual 100 %" in sira and "fallback" not in sira
    assert "fallback: predicted 0.55, actual 0 %" in fallback


async def test_kpi_page_without_data_and_its_window_selector(client, viewer):
    await sign_in(client, viewer)
    page = await page_of(client, "/ops/kpis?days=30")
    assert '<option value="30" selected>last 30 days</option>' in page
    assert "Numbers over the last 30 days" in page
    assert page.count("no data yet") >= 8
    assert "<strong>n/a</strong>" in page
    # A window not offered falls back to the default one.
    assert '<option value="7" selected>' in await page_of(client, "/ops/kpis?days=5000")
    assert '<option value="7" selected>' in await page_of(client, "/ops/kpis?days=soon")


async def test_kpi_page_needs_a_session(client):
    response = await client.get("/ops/kpis?days=1")
    assert response.status_code == 303
    assert response.headers["location"] == "/ops/login?next=%2Fops%2Fkpis%3Fdays%3D1"


# --- attempts ------------------------------------------------------------------------------


async def test_attempt_history_with_filters_links_each_attempt(
    client, db, plugin, viewer, settings
):
    incident = add_incident(db, plugin.id, status="resolved")
    done = add_attempt(db, incident_id=incident, installation_id=plugin.id, status="success")
    orders = await register(settings, tenant="merchant-2", name="orders")
    failed = add_attempt(db, incident_id=None, installation_id=orders.id, status="failed")

    await sign_in(client, viewer)
    page = await page_of(client, "/ops/attempts")
    assert 'aria-current="page">Attempts</a>' in page
    assert f'href="/ops/attempts/{done}"' in page and f'href="/ops/attempts/{failed}"' in page
    assert f'href="/ops/incidents/{incident}"' in page
    assert f'href="/ops/fleet/{orders.id}"' in page
    for query, shown, hidden in (
        ("?status=failed", failed, done),
        ("?plugin=payments", done, failed),
        (f"?incident={incident}", done, failed),
    ):
        filtered = await page_of(client, "/ops/attempts" + query)
        assert f"/ops/attempts/{shown}" in filtered, query
        assert f"/ops/attempts/{hidden}" not in filtered, query
    bad = await page_of(client, "/ops/attempts?incident=nope&status=exploded")
    assert "The incident filter is not an incident id" in bad
    assert f"/ops/attempts/{done}" in bad and f"/ops/attempts/{failed}" in bad
    assert "No attempt matches." in await page_of(client, "/ops/attempts?plugin=nothing")
    # The incident page links its attempts.
    assert f'href="/ops/attempts/{done}"' in await page_of(client, f"/ops/incidents/{incident}")


async def test_attempt_page_shows_its_event_log_and_says_the_chain_verifies(
    client, db, plugin, viewer
):
    attempt = add_attempt(db, incident_id=None, installation_id=plugin.id, status="pending")
    db.execute("SELECT set_config('selfheal.actor', 'user:otto', false)")
    db.execute("UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s", (attempt,))
    await sign_in(client, viewer)
    page = await page_of(client, f"/ops/attempts/{attempt}")
    assert "<strong>Hash chain: verified</strong>" in page
    assert "NOT verified" not in page
    assert "created → pending" in page and "pending → staging" in page
    assert "not named (plain SQL)" in page and "user:otto" in page
    assert "<td>postgres</td>" in page
    assert page.count("hash ok, linked") == 2
    # In flight: the page refreshes itself.
    assert f'content="15;url=/ops/attempts/{attempt}?refresh=1"' in page
    for missing in (uuid.uuid4(), "not-a-uuid"):
        assert (await client.get(f"/ops/attempts/{missing}")).status_code == 404


async def test_attempt_page_names_the_first_broken_event(client, db, plugin, viewer):
    attempt = add_attempt(db, incident_id=None, installation_id=plugin.id, status="success")
    db.execute("ALTER TABLE plugin_autopatch_attempt_events DISABLE TRIGGER ALL")
    tampered = db.execute(
        "UPDATE plugin_autopatch_attempt_events SET actor = 'user:mallory'"
        " WHERE attempt_id = %s RETURNING id",
        (attempt,),
    ).fetchone()[0]
    await sign_in(client, viewer)
    page = await page_of(client, f"/ops/attempts/{attempt}")
    assert f"<strong>Hash chain: NOT verified: first broken event {tampered}</strong>" in page
    assert "HASH MISMATCH, linked" in page
    assert "refresh" not in page.split("<title>")[0]  # finished: no automatic refresh


# --- the fleet and the releases --------------------------------------------------------------


async def test_fleet_lists_installations_with_health_counts_filters_and_paging(
    client, db, viewer, settings
):
    ok = await register(settings, tenant="merchant-a")
    unseen = await register(settings, tenant="merchant-b")
    sick = await register(settings, tenant="merchant-c", name="orders")
    for installation in (ok, sick):
        assert (await send_heartbeat(client, installation, heartbeat_body())).status_code == 200
    incident = add_incident(db, sick.id, tenant="merchant-c", plugin="orders", severity="high")

    await sign_in(client, viewer)
    page = await page_of(client, "/ops/fleet")
    assert 'aria-current="page">Fleet</a>' in page
    for installation in (ok, unseen, sick):
        assert f'href="/ops/fleet/{installation.id}"' in page
    # Health as text and colour, counts by health, the open incident linked.
    assert '<span class="badge h-ok">ok</span> <strong>1</strong>' in page
    assert '<span class="badge h-unseen">unseen</span> <strong>1</strong>' in page
    assert '<span class="badge h-incident">incident</span> <strong>1</strong>' in page
    assert "all <strong>3</strong>" in page
    assert f'<a href="/ops/incidents/{incident}"><span class="badge sev-high">high</span>' in page
    assert "registered, no heartbeat yet" in page
    for query, shown, hidden in (
        ("?health=unseen", unseen, ok),
        ("?plugin=orders", sick, ok),
        ("?tenant=merchant-a", ok, sick),
    ):
        filtered = await page_of(client, "/ops/fleet" + query)
        assert f"/ops/fleet/{shown.id}" in filtered, query
        assert f"/ops/fleet/{hidden.id}" not in filtered, query
    assert "No installation matches." in await page_of(client, "/ops/fleet?version=9.9.9")
    bad = await page_of(client, "/ops/fleet?cursor=nonsense")
    assert "cursor is not one this page handed out" in bad


async def test_fleet_pages_through_every_installation(client, viewer, settings, monkeypatch):
    from app.dashboard import fleet

    monkeypatch.setattr(fleet, "PAGE_SIZE", 2)
    installed = [await register(settings, tenant=f"merchant-{n}") for n in range(3)]
    await sign_in(client, viewer)
    first = await page_of(client, "/ops/fleet")
    assert "First page" not in first
    next_href = re.search(r'<a href="(\?[^"]*cursor=[^"]+)">Next page</a>', first)
    assert next_href, first
    second = await page_of(client, "/ops/fleet" + next_href.group(1).replace("&amp;", "&"))
    assert "Next page" not in second and "First page" in second
    seen = [i.id for i in installed if f"/ops/fleet/{i.id}" in first]
    seen += [i.id for i in installed if f"/ops/fleet/{i.id}" in second]
    assert sorted(seen) == sorted(i.id for i in installed)


async def test_installation_page_heartbeat_charts_version_history_and_known_good(
    client, db, plugin, viewer
):
    for uptime, version in enumerate(["1.2.2", "1.2.3", "1.2.2"], start=100):
        body = heartbeat_body(plugin_version=version, uptime_s=uptime)
        assert (await send_heartbeat(client, plugin, body)).status_code == 200
    db.execute(
        "UPDATE merchant_plugins SET known_good_version = '1.2.2', known_good_at = now()"
        " WHERE id = %s",
        (plugin.id,),
    )
    await sign_in(client, viewer)
    page = await page_of(client, f"/ops/fleet/{plugin.id}")
    assert "Known-good version</th><td><strong>1.2.2</strong>" in page
    assert "(before: 1.2.3)" in page
    requests = chart_titled(page, "Requests per heartbeat")
    assert "requests: 1200" in requests and "<polyline" in requests
    assert "errors: 3" in chart_titled(page, "Errors and webhook failures per heartbeat")
    history = page.split('id="versions"', 1)[1]
    assert history.count("<tr><td>1.2.2") == 2 and history.count("<tr><td>1.2.3") == 1
    assert "known good</span>" in history
    assert "Latest: 1200 requests, 3 errors" in page
    for missing in (uuid.uuid4(), "nope"):
        assert (await client.get(f"/ops/fleet/{missing}")).status_code == 404


async def test_releases_show_quarantine_and_rates_per_version(client, db, plugin, viewer):
    add_release(db, "payments", "1.2.3")
    add_release(db, "payments", "1.2.4", quarantined=True)
    for status in ("success", "success", "success", "rolled_back"):
        add_attempt(db, incident_id=None, installation_id=plugin.id, status=status)
    await sign_in(client, viewer)
    page = await page_of(client, "/ops/releases")
    assert 'aria-current="page">Releases</a>' in page
    rows = page.split("<tbody>", 1)[1].split("<tr>")[1:]
    quarantined, current = rows
    assert ">1.2.4</a>" in quarantined and "quarantined</span>" in quarantined
    assert "rolled back twice" in quarantined and quarantined.count("<td>n/a</td>") == 2
    assert ">1.2.3</a>" in current and "available</span>" in current
    assert "<td>75 %</td>" in current and "<td>25 %</td>" in current
    assert "No release of orders." in await page_of(client, "/ops/releases?plugin=orders")


# --- the policy page: maintenance windows and the history of changes -------------------------


def window_ends(db, window: str) -> tuple[bool, str]:
    """(over, reason) of a window."""
    row = db.execute(
        "SELECT ends_at <= now(), reason FROM maintenance_windows WHERE id = %s", (window,)
    ).fetchone()
    return bool(row[0]), str(row[1])


async def test_policy_page_lists_open_and_coming_windows_and_an_operator_ends_one(
    client, db, plugin, operator
):
    open_now = add_window(db, installation_id=plugin.id, reason="deploying")
    coming = add_window(db, tenant=plugin.tenant, starts_in_s=7200, reason="db upgrade")
    over = add_window(db, tenant=plugin.tenant, starts_in_s=-7200, lasts_s=60, reason="old one")
    csrf = await sign_in(client, operator)
    page = await page_of(client, "/ops/policy")
    windows = page.split('id="windows"', 1)[1].split('id="history"', 1)[0]
    assert windows.index(open_now) < windows.index(coming)
    assert over not in windows and "old one" not in windows
    assert "open now</span>" in windows and "to come</span>" in windows
    assert f'<a href="/ops/fleet/{plugin.id}">installation {plugin.id}</a>' in windows
    assert f"tenant {plugin.tenant}" in windows and "db upgrade" in windows
    assert f'action="/ops/policy/windows/{open_now}/end"' in windows

    response = await post_form(client, f"/ops/policy/windows/{open_now}/end", csrf)
    assert response.headers["location"] == "/ops/policy"
    after = await flash_after(client, response)
    assert f"Maintenance window for installation {plugin.id} ended at" in after
    assert window_ends(db, open_now) == (True, "deploying (ended early by user:otto)")
    assert open_now not in after.split('id="windows"', 1)[1].split('id="history"', 1)[0]
    again = await post_form(client, f"/ops/policy/windows/{open_now}/end", csrf)
    assert "Not done: this window is already over" in await flash_after(client, again)
    unknown = await post_form(client, f"/ops/policy/windows/{uuid.uuid4()}/end", csrf)
    assert "Not done: no such maintenance window" in await flash_after(client, unknown)


async def test_a_viewer_cannot_end_a_window_and_the_form_needs_its_csrf_token(
    client, browser, db, plugin, viewer, operator
):
    window = add_window(db, installation_id=plugin.id)
    csrf = await sign_in(client, viewer)
    page = await page_of(client, "/ops/policy")
    assert "/end" not in page and "Only an operator can end a window." in page
    refused = await post_form(client, f"/ops/policy/windows/{window}/end", csrf)
    assert refused.status_code == 403
    assert "this needs the operator role; you are viewer" in refused.text

    other = browser
    operator_csrf = await sign_in(other, operator)
    for token in (None, "wrong", csrf):  # none, made up, another session's
        forged = await post_form(other, f"/ops/policy/windows/{window}/end", token)
        assert forged.status_code == 403, token
        assert "security token is missing or out of date" in forged.text
    assert window_ends(db, window) == (False, "deploying")
    assert (
        await post_form(other, f"/ops/policy/windows/{window}/end", operator_csrf)
    ).status_code == 303
    assert window_ends(db, window)[0]


async def test_policy_history_shows_changes_with_who_made_them_sql_included(
    client, db, admin, viewer
):
    csrf = await sign_in(client, admin)
    on = await post_form(client, "/ops/policy/kill-switch", csrf, autopatch="on", confirm="ENABLE")
    assert on.status_code == 303
    db.execute("UPDATE ops_policy SET canary_percent = 30, cooldown_s = 60")
    await sign_in(client, viewer)
    page = await page_of(client, "/ops/policy")
    history = page.split('id="history"', 1)[1]
    rows = history.split("<tbody>", 1)[1].split("<tr>")[1:]
    psql, dashboard = rows  # newest first
    assert "not named: SQL without an ops user" in psql and "<td>postgres</td>" in psql
    assert "canary_percent: 100 → 30" in psql and "cooldown_s: 3600 → 60" in psql
    assert "autopatch_enabled" not in psql
    assert "<td>user:ada</td>" in dashboard and "autopatch_enabled: off → on" in dashboard


# --- every new page ----------------------------------------------------------------------------


async def test_new_pages_need_a_session_link_each_other_and_show_no_secret(
    client, db, plugin, viewer, operator, admin
):
    incident = add_incident(db, plugin.id)
    attempt = add_attempt(db, incident_id=incident, installation_id=plugin.id, status="pending")
    add_window(db, installation_id=plugin.id)
    assert (await send_heartbeat(client, plugin, heartbeat_body())).status_code == 200
    pages = [
        "/ops/kpis",
        "/ops/attempts",
        f"/ops/attempts/{attempt}",
        "/ops/fleet",
        f"/ops/fleet/{plugin.id}",
        "/ops/releases",
        "/ops/policy",
    ]
    for path in pages:
        response = await client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/ops/login?next="), path
    await sign_in(client, viewer)
    secrets = [plugin.secret, viewer.token, operator.token, admin.token]
    session_id = client.cookies[SESSION_COOKIE]
    for path in pages:
        page = await page_of(client, path)
        for link in ("/ops/incidents", "/ops/attempts", "/ops/fleet", "/ops/releases", "/ops/kpis"):
            assert f'<a href="{link}"' in page, (path, link)
        for secret in [*secrets, session_id]:
            assert secret not in page, path


# --- one incident: baseline, staging, commands, verification ---------------------------------


async def test_incident_page_shows_baseline_staging_commands_and_verification(
    client, db, plugin, viewer
):
    # Ten quiet heartbeats before the first bad signal (and one older, outside the baseline),
    # then two bad ones before detection.
    add_heartbeat(db, plugin.id, ago_s=4000, requests=1000, errors=900)
    for n in range(10):
        add_heartbeat(
            db,
            plugin.id,
            ago_s=1000 + n * 60,
            requests=1000,
            errors=1,
            webhook_attempts=10,
            webhook_failures=0,
        )
    for ago in (110, 70):
        add_heartbeat(
            db,
            plugin.id,
            ago_s=ago,
            requests=500,
            errors=100,
            webhook_attempts=20,
            webhook_failures=5,
        )
    incident = add_incident(
        db,
        plugin.id,
        status="verifying",
        detected_ago_s=60,
        first_bad_before_s=60,
        decision=SIRA,
        decided_ago_s=50,
    )
    failed = add_attempt(
        db,
        incident_id=incident,
        installation_id=plugin.id,
        status="failed",
        to_version="1.2.3",
        staging_report={"status": "passed", "run_id": "run-1"},
    )
    add_command(db, failed, status="failed", error="disk full on the shop", deliveries=2)
    verifying = add_attempt(
        db,
        incident_id=incident,
        installation_id=plugin.id,
        status="verifying",
        to_version="1.2.4",
        verify_in_s=600,
        staging_report={
            "status": "passed",
            "run_id": "run-2",
            "report": {"summary": "42 checks passed"},
        },
    )
    add_command(db, verifying, version="1.2.4", status="acked", deliveries=1)
    deadline = db.execute(
        "SELECT to_char(verify_deadline_at AT TIME ZONE 'UTC', 'HH24:MI:SS')"
        " FROM plugin_autopatch_attempts WHERE id = %s",
        (verifying,),
    ).fetchone()[0]

    await sign_in(client, viewer)
    page = await page_of(client, f"/ops/incidents/{incident}")
    compare = page.split("Telemetry at detection vs baseline", 1)[1].split("</table>", 1)[0]
    assert "2 heartbeats" in compare and "the 10 heartbeats before" in compare
    assert '<th scope="row">Requests</th><td>1000</td><td>10000</td>' in compare
    assert '<th scope="row">Error ratio</th><td>20.00 %</td><td>0.10 %</td>' in compare
    assert '<th scope="row">Webhook fail rate</th><td>25.00 %</td><td>0.00 %</td>' in compare
    # Each attempt: its staging report, its commands with their states, its verification.
    assert '<span class="badge stg-passed">passed</span> 42 checks passed' in page
    assert "update 1.2.4" in page and '<span class="badge cmd-acked">acked</span>' in page
    assert "acked <time" in page
    assert '<span class="badge cmd-failed">failed</span>' in page
    assert "failed <time" in page and "disk full on the shop" in page
    assert f"verifying until {deadline} UTC" in page
    assert 'never reached: the attempt ended <span class="badge at-failed">failed</span>' in page
    assert f"verifying health until {deadline} UTC" in page  # what happens next

    listing = await page_of(client, "/ops/incidents")
    assert f"verifying health until {deadline} UTC" in listing


async def test_incident_page_without_baseline_or_commands_says_so(client, db, plugin, viewer):
    incident = add_incident(db, plugin.id, status="staging", first_bad_before_s=0)
    add_attempt(db, incident_id=incident, installation_id=plugin.id, status="staging")
    await sign_in(client, viewer)
    page = await page_of(client, f"/ops/incidents/{incident}")
    assert "No heartbeat before the first bad signal: no baseline to compare with." in page
    assert "no staging report" in page and "No command sent for this attempt." in page
    assert "not yet: the attempt is staging" in page


# --- users (admin) ---------------------------------------------------------------------------


def user_row(db, username: str) -> tuple[str, str, bool]:
    """(id, role, disabled) of an ops user."""
    row = db.execute(
        "SELECT id::text, role, disabled_at IS NOT NULL FROM ops_users WHERE username = %s",
        (username,),
    ).fetchone()
    assert row, username
    return row[0], row[1], row[2]


def stored_secrets(db) -> list[str]:
    """Every password hash and API token hash in the database, in the forms a page could show."""
    hashes = [row[0] for row in db.execute("SELECT password_hash FROM ops_users")]
    for (digest,) in db.execute("SELECT token_hash FROM ops_api_tokens"):
        hashes += [bytes(digest).hex(), base64.urlsafe_b64encode(bytes(digest)).decode()[:20]]
    return hashes


def shown(html: str, element: str) -> str:
    found = re.search(rf'<code class="secret" id="{element}">([^<]+)</code>', html)
    assert found, element
    return found.group(1)


async def test_an_admin_adds_a_user_whose_password_shows_once_and_signs_in(
    client, browser, db, admin
):
    csrf = await sign_in(client, admin)
    listed = await page_of(client, "/ops/users")
    assert '<a href="/ops/users" aria-current="page">Users</a>' in listed
    assert 'id="user-ada"' in listed and "ada (you)" in listed

    added = await post_form(client, "/ops/users", csrf, username="nina", role="operator")
    assert added.status_code == 200, added.text  # the page itself: no redirect, no URL
    assert added.headers["cache-control"] == "no-store"
    password, token = shown(added.text, "new-password"), shown(added.text, "new-token")
    assert "nina (operator) is added" in added.text and "Shown once" in added.text
    assert user_row(db, "nina")[1:] == ("operator", False)

    again = await page_of(client, "/ops/users")  # a reload, or the back-and-forth to the list
    assert 'id="user-nina"' in again
    assert password not in again and token not in again and "new-password" not in again
    for secret in stored_secrets(db):
        assert secret not in added.text and secret not in again
    assert "$argon2" not in added.text + again

    response = await try_sign_in(browser, "nina", password)
    assert response.status_code == 303, response.text
    nina = await page_of(browser, "/ops/incidents")
    assert "Signed in as <strong>nina</strong> (operator)" in nina
    assert 'href="/ops/users"' not in nina  # the link is for admins
    api = await client.get("/api/ops/policy", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 200, api.text

    taken = await post_form(client, "/ops/users", csrf, username="nina", role="viewer")
    page = await flash_after(client, taken)
    assert "Not added: user &#39;nina&#39; already exists" in page and password not in page
    bad = await post_form(client, "/ops/users", csrf, username="no spaces", role="viewer")
    assert "Not added: &#39;no spaces&#39; is not a valid user name" in await flash_after(
        client, bad
    )
    odd = await post_form(client, "/ops/users", csrf, username="zed", role="root")
    assert "Not added: --role must be one of" in await flash_after(client, odd)
    assert db.execute("SELECT count(*) FROM ops_users").fetchone()[0] == 2


async def test_an_admin_changes_a_role_but_not_their_own_nor_disables_themself(
    client, db, admin, viewer
):
    csrf = await sign_in(client, admin)
    vera, _, _ = user_row(db, "vera")
    ada, _, _ = user_row(db, "ada")
    page = await page_of(client, "/ops/users")
    assert f'action="/ops/users/{vera}/role"' in page
    assert f'action="/ops/users/{ada}/' not in page  # no form against oneself

    changed = await post_form(client, f"/ops/users/{vera}/role", csrf, role="operator")
    assert changed.headers["location"] == "/ops/users"
    assert "vera is now operator." in await flash_after(client, changed)
    assert user_row(db, "vera")[1] == "operator"
    same = await post_form(client, f"/ops/users/{vera}/role", csrf, role="operator")
    assert "Role not changed: vera is already operator" in await flash_after(client, same)
    wrong = await post_form(client, f"/ops/users/{vera}/role", csrf, role="root")
    assert "Role not changed: the role must be one of" in await flash_after(client, wrong)
    unknown = await post_form(client, f"/ops/users/{uuid.uuid4()}/role", csrf, role="viewer")
    assert "Role not changed: no such user" in await flash_after(client, unknown)

    demote = await post_form(client, f"/ops/users/{ada}/role", csrf, role="viewer")
    assert "Role not changed: you cannot change your own role" in await flash_after(client, demote)
    off = await post_form(client, f"/ops/users/{ada}/disable", csrf)
    assert "Not disabled: you cannot disable yourself" in await flash_after(client, off)
    assert user_row(db, "ada")[1:] == ("admin", False)
    assert (await client.get("/ops/users")).status_code == 200  # still signed in, still admin


async def test_disabling_a_user_ends_their_sessions_and_revokes_their_token(
    client, browser, db, admin, operator
):
    csrf = await sign_in(client, admin)
    await sign_in(browser, operator)
    otto, _, _ = user_row(db, "otto")
    assert (await client.get("/api/ops/policy", headers=operator.auth)).status_code == 200
    assert "(no live token)" not in (await page_of(client, "/ops/users")).split('id="user-otto"')[1]

    off = await post_form(client, f"/ops/users/{otto}/disable", csrf)
    page = await flash_after(client, off)
    assert "otto is disabled: 1 dashboard session(s) ended, API tokens revoked." in page
    row = page.split('id="user-otto"', 1)[1].split("</tr>", 1)[0]
    assert "disabled</span>" in row and "(no live token)" in row
    assert f'action="/ops/users/{otto}/enable"' in row
    assert user_row(db, "otto")[2]
    assert db.execute(
        "SELECT count(*) FROM ops_sessions WHERE user_id = %s", (otto,)
    ).fetchone() == (0,)

    gone = await browser.get("/ops/incidents")
    assert gone.status_code == 303 and "notice=expired" in gone.headers["location"]
    api = await client.get("/api/ops/policy", headers=operator.auth)
    assert api.status_code == 401, api.text
    assert (await try_sign_in(browser, "otto", operator.password)).status_code == 401
    again = await post_form(client, f"/ops/users/{otto}/disable", csrf)
    assert "Not disabled: otto is already disabled" in await flash_after(client, again)

    on = await post_form(client, f"/ops/users/{otto}/enable", csrf)
    assert "otto is enabled again" in await flash_after(client, on)
    assert (await try_sign_in(browser, "otto", operator.password)).status_code == 303
    assert (await client.get("/api/ops/policy", headers=operator.auth)).status_code == 401

    # The audit log has each change with who made it, and no secret's hash.
    audited = db.execute(
        "SELECT entity, actor, old, new FROM audit_log"
        " WHERE entity IN ('ops_users', 'ops_api_tokens') AND actor = 'user:ada' ORDER BY id"
    ).fetchall()
    user_changes = [
        (old["disabled_at"] is None, new["disabled_at"] is None)
        for entity, _, old, new in audited
        if entity == "ops_users" and new["username"] == "otto"
    ]
    assert user_changes == [(True, False), (False, True)]
    assert any(entity == "ops_api_tokens" and new["revoked_at"] for entity, _, _, new in audited)
    dumped = str(db.execute("SELECT old, new FROM audit_log").fetchall())
    assert "password_hash" not in dumped and "token_hash" not in dumped


async def test_users_page_and_forms_are_for_admins_with_the_csrf_token(
    client, browser, db, viewer, operator, admin
):
    vera, _, _ = user_row(db, "vera")
    anonymous = await client.get("/ops/users")
    assert anonymous.status_code == 303
    assert anonymous.headers["location"].startswith("/ops/login?next=")
    forms = [
        ("/ops/users", {"username": "mallory", "role": "admin"}),
        (f"/ops/users/{vera}/role", {"role": "admin"}),
        (f"/ops/users/{vera}/disable", {}),
        (f"/ops/users/{vera}/enable", {}),
    ]
    for persona in (viewer, operator):
        csrf = await sign_in(client, persona)
        page = await client.get("/ops/users")
        assert page.status_code == 403, persona.role
        assert f"this needs the admin role; you are {persona.role}" in page.text
        assert 'href="/ops/users"' not in await page_of(client, "/ops/policy")
        for path, fields in forms:
            refused = await post_form(client, path, csrf, **fields)
            assert refused.status_code == 403, (persona.role, path)
            assert "this needs the admin role" in refused.text

    admin_csrf = await sign_in(browser, admin)
    for token in (None, "wrong", csrf):  # none, made up, another session's
        for path, fields in forms:
            forged = await post_form(browser, path, token, **fields)
            assert forged.status_code == 403, (token, path)
            assert "security token is missing or out of date" in forged.text
    assert user_row(db, "vera")[1:] == ("viewer", False)
    assert db.execute("SELECT count(*) FROM ops_users WHERE username = 'mallory'").fetchone() == (
        0,
    )
    done = await post_form(browser, f"/ops/users/{vera}/disable", admin_csrf)
    assert done.status_code == 303
    assert user_row(db, "vera")[2]
