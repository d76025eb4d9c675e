"""The ops dashboard in a real browser (issue 9): Playwright driving Debian's chromium
(/usr/bin/chromium, headless, no sandbox) against the control plane as a user runs it: the
API and a worker as `selfheal` processes at default settings, the reference decision service
and staging runner as processes, plugins embedding the real plugin_client.

The run, as operators live it:
1. otto (operator) signs in through the form;
2. a plugin fails 60% of its webhooks on 1.2.2: the incident waits for 2 approvals (policy:
   approvals_required=2, approval_min_severity=medium); the list says so;
3. otto opens it, approves the patch to 1.2.3 from the detail page (the form carries the
   action's key): 1 of 2;
4. olga (another operator, her own browser session) approves: 2 of 2, the quorum;
5. the worker stages and applies it, the plugin updates, the attempt ends in success and the
   incident resolved, on the incident page;
6. ada (admin) lets medium incidents be patched without approvals, then flips the kill switch
   (a wrong confirmation word first: refused); the banner shows on every page;
7. a second plugin falls sick the same way: the worker holds it, blocked by the kill switch
   alone, and sends nothing; ada turns autopatch back on and the worker patches it;
8. the KPI page: an autopatch success rate of 100 %, charts drawn.

A screenshot is taken after every step, into a directory per run whose path is printed
(.selfheal-test/browser/..., or SELFHEAL_BROWSER_SHOTS); docs/screenshots/ holds a few of them.

Without chromium or the playwright package the test skips, saying why; with
SELFHEAL_BROWSER_TESTS=required (.ci/run sets it, after installing chromium) it fails instead.
Every wait is bounded polling on what the page shows (reloading it) or on the database."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.core.settings import Settings
from tests.support.browser import (
    REQUIRED,
    VIEWPORT,
    Shots,
    browser_unavailable,
    launch,
    sign_in,
    submit,
    text_in,
    until_shows,
)
from tests.support.control_plane import (
    ControlPlane,
    SimulatedPlugin,
    at_defaults,
    control_plane_processes,
    plugins_running,
)
from tests.support.healing import add_release
from tests.support.personas import make_user
from tests.support.plugins import register

pytestmark = [pytest.mark.long_e2e, pytest.mark.timeout(600)]


def sick_on_1_2_2(version: str) -> float:
    """The truth of both plugins: 1.2.2 fails 60% of its webhooks, 1.2.3 fixes it."""
    return 0.6 if version == "1.2.2" else 0.0


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Chromium, started before anything else: without it the test skips (or fails, when
    required) before minutes of processes."""
    reason = browser_unavailable()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"SELFHEAL_BROWSER_TESTS=required, and {reason}")
        pytest.skip(reason)
    from playwright.async_api import Error, async_playwright

    async with async_playwright() as playwright:
        try:
            chromium = await launch(playwright)
        except Error as exc:
            if REQUIRED:
                pytest.fail(f"SELFHEAL_BROWSER_TESTS=required, and chromium did not start: {exc}")
            pytest.skip(f"chromium did not start: {str(exc).splitlines()[0]}")
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def shots(capsys: pytest.CaptureFixture[str]) -> Shots:
    taken = Shots.for_run("dashboard")
    with capsys.disabled():
        print(f"\nbrowser test screenshots: {taken.directory}")
    return taken


@pytest.fixture
def defaults(settings: Settings, tmp_path: Path) -> Settings:
    return at_defaults(settings, tmp_path)


@pytest.fixture
def plane(defaults: Settings) -> Iterator[ControlPlane]:
    with control_plane_processes(defaults) as running:
        yield running


def incident_rows(db: Any, tenant: str) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = db.execute(
        "SELECT i.id::text, i.status, i.status_reason FROM plugin_incidents i"
        " JOIN merchant_plugins p ON p.id = i.installation_id WHERE p.tenant_id = %s"
        " ORDER BY i.detected_at",
        (tenant,),
    ).fetchall()
    return rows


def attempt_rows(db: Any, tenant: str) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = db.execute(
        "SELECT a.action, a.from_version, a.to_version, a.status FROM plugin_autopatch_attempts a"
        " JOIN merchant_plugins p ON p.id = a.installation_id WHERE p.tenant_id = %s"
        " ORDER BY a.created_at",
        (tenant,),
    ).fetchall()
    return rows


def command_count(db: Any, tenant: str) -> int:
    count: int = db.execute(
        "SELECT count(*) FROM plugin_agent_commands c"
        " JOIN merchant_plugins p ON p.id = c.installation_id WHERE p.tenant_id = %s",
        (tenant,),
    ).fetchone()[0]
    return count


async def test_operators_heal_an_incident_and_an_admin_stops_the_loop_in_a_browser(
    browser, shots, defaults, plane, db, tmp_path
):
    started = time.monotonic()
    base = plane.url
    first = await register(defaults, tenant="merchant-42", name="erp_crm")
    second = await register(defaults, tenant="merchant-7", name="payments")
    await add_release(defaults, tmp_path, "erp_crm", "1.2.3")
    await add_release(defaults, tmp_path, "payments", "1.2.3")
    # Autopatch on for both tenants; a webhook incident (medium) needs 2 distinct approvers.
    db.execute(
        "UPDATE ops_policy SET autopatch_enabled = true, autopatch_whitelist = %s::jsonb,"
        " approvals_required = 2, approval_min_severity = 'medium' WHERE id = 1",
        (orjson.dumps(["merchant-42", "merchant-7"]).decode(),),
    )
    otto = await make_user(defaults, "otto", "operator")
    olga = await make_user(defaults, "olga", "operator")
    ada = await make_user(defaults, "ada", "admin")

    async def new_page() -> Any:
        context = await browser.new_context(viewport=VIEWPORT, base_url=base)
        return await context.new_page()

    # 1. Sign in: a page asked for before signing in leads to the form, then back to it.
    page = await new_page()
    await page.goto("/ops/incidents")
    assert "/ops/login" in page.url
    await page.get_by_label("User name").fill(otto.username)
    await page.get_by_label("Password").fill(otto.password)
    await shots.take(page, "sign-in")
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(re.compile(r"/ops/incidents$"))
    assert "Signed in as otto (operator)" in await page.locator("header").inner_text()

    sick_first = SimulatedPlugin(plane.agent(first, "1.2.2", tmp_path / "state-1"), sick_on_1_2_2)
    sick_second = SimulatedPlugin(plane.agent(second, "1.2.2", tmp_path / "state-2"), sick_on_1_2_2)
    async with plugins_running(sick_first):
        # 2. The incident appears in the list, waiting for 2 approvals.
        listed = "/ops/incidents?tenant=merchant-42"
        await until_shows(
            page,
            listed,
            text_in("table.list", "awaiting approval", "needs 2 approvals"),
            "the webhook incident waiting for approvals",
            timeout_s=120,
        )
        row = page.locator("table.list tbody tr")
        assert await row.count() == 1
        assert "webhook fail rate" in await row.inner_text()
        await page.goto("/ops/incidents")
        await shots.take(page, "incidents-awaiting-approval")
        [(incident, status, _)] = incident_rows(db, "merchant-42")
        assert status == "awaiting_approval"

        # 3. otto opens it from the list and approves the action shown.
        await page.goto(listed)
        await row.get_by_role("link").click()
        await page.wait_for_url(re.compile(f"/ops/incidents/{incident}$"))
        # The decision, the pending action and the approve form in one view.
        await page.goto(f"/ops/incidents/{incident}#decision")
        approve = page.get_by_role("button", name="Approve patch to 1.2.3")
        key = await page.locator("input[name=action_key]").input_value()
        assert key
        await page.locator("#approve-comment").fill("webhook failures since 1.2.2")
        await shots.take(page, "incident-approve-form")
        await submit(page, approve)
        flash = await page.locator(".flash").inner_text()
        assert "Approved patch to 1.2.3: 1 of 2 approvals." in flash, flash
        approvals = page.locator("section[aria-labelledby=approvals]")
        assert "otto" in await approvals.inner_text()
        await shots.take(page, "first-approval")

        # 4. olga, in her own session, makes the quorum.
        olga_page = await new_page()
        await sign_in(olga_page, base, olga)
        await olga_page.goto(f"/ops/incidents/{incident}")
        assert await olga_page.locator("input[name=action_key]").input_value() == key
        await submit(olga_page, olga_page.get_by_role("button", name="Approve patch to 1.2.3"))
        flash = await olga_page.locator(".flash").inner_text()
        assert "2 of 2 approvals" in flash, flash
        await shots.take(olga_page, "quorum-reached")

        # 5. The worker stages and applies it; the attempt ends in success.
        await until_shows(
            page,
            f"/ops/incidents/{incident}",
            text_in("main", "resolved", "Nothing more"),
            "the incident resolved",
            timeout_s=120,
        )
        attempt = page.locator("section[aria-labelledby=attempts] > table.list > tbody > tr")
        assert await attempt.count() == 1
        assert "1.2.2 → 1.2.3" in await attempt.inner_text()
        assert await attempt.locator(".badge").inner_text() == "success"
        await page.locator("#attempts").scroll_into_view_if_needed()
        await shots.take(page, "attempt-success")
    assert sick_first.applied == [("update", "1.2.3")]
    assert attempt_rows(db, "merchant-42") == [("patch", "1.2.2", "1.2.3", "success")]
    voters = db.execute(
        "SELECT u.username FROM approvals a JOIN ops_users u ON u.id = a.user_id"
        " WHERE a.incident_id = %s ORDER BY a.created_at",
        (incident,),
    ).fetchall()
    assert voters == [("otto",), ("olga",)]

    # 6. ada: medium incidents no longer need approvals (so only the kill switch can hold the
    # next one), then the kill switch, with its confirmation word.
    admin = await new_page()
    await sign_in(admin, base, ada)
    await admin.goto("/ops/policy")
    await admin.get_by_label("Approvals needed from this severity").select_option("high")
    await submit(admin, admin.get_by_role("button", name="Save the rules"))
    flash = await admin.locator(".flash").inner_text()
    assert "Policy saved: approval_min_severity changed." in flash, flash
    await admin.get_by_label("Type DISABLE to confirm").fill("disable")
    await submit(admin, admin.get_by_role("button", name="Turn autopatch OFF (kill switch)"))
    flash = await admin.locator(".flash").inner_text()
    assert "type DISABLE in the confirmation box" in flash, flash
    assert await admin.locator(".banner").count() == 0
    await admin.get_by_label("Type DISABLE to confirm").fill("DISABLE")
    await shots.take(admin, "kill-switch-confirm")
    await submit(admin, admin.get_by_role("button", name="Turn autopatch OFF (kill switch)"))
    assert "AUTOPATCH IS OFF" in await admin.locator(".banner").inner_text()
    assert "Autopatch is OFF" in await admin.locator("section.kill").inner_text()
    await shots.take(admin, "kill-switch-banner")
    # The banner is on every page, for everyone.
    await page.goto("/ops/incidents")
    assert "AUTOPATCH IS OFF" in await page.locator(".banner").inner_text()
    assert db.execute("SELECT autopatch_enabled FROM ops_policy").fetchone() == (False,)

    # 7. The second plugin falls sick: the worker holds it, for the kill switch alone.
    async with plugins_running(sick_second):
        await until_shows(
            page,
            "/ops/incidents?tenant=merchant-7",
            text_in("table.list", "blocked by policy", "kill switch"),
            "the second incident held by the kill switch",
            timeout_s=120,
        )
        [(held, status, reason)] = incident_rows(db, "merchant-7")
        assert (status, reason) == (
            "blocked_by_policy",
            "waiting: autopatch is disabled (kill switch)",
        )
        assert attempt_rows(db, "merchant-7") == []
        assert command_count(db, "merchant-7") == 0
        await page.goto("/ops/incidents")
        await shots.take(page, "incidents-one-held-by-kill-switch")
        await page.goto(f"/ops/incidents/{held}")
        assert "autopatch is disabled (kill switch)" in await page.locator("p.next").inner_text()
        await shots.take(page, "held-by-kill-switch")

        # Autopatch back on: the same worker patches it, no approval asked.
        await admin.goto("/ops/policy")
        await admin.get_by_label("Type ENABLE to confirm").fill("ENABLE")
        await submit(admin, admin.get_by_role("button", name="Turn autopatch back ON"))
        assert await admin.locator(".banner").count() == 0
        await until_shows(
            page,
            f"/ops/incidents/{held}",
            text_in("section[aria-labelledby=attempts]", "success"),
            "the held incident patched once autopatch is back on",
            timeout_s=120,
        )
        await shots.take(page, "patched-after-kill-switch")
    assert sick_second.applied == [("update", "1.2.3")]
    assert attempt_rows(db, "merchant-7") == [("patch", "1.2.2", "1.2.3", "success")]
    switches = db.execute(
        "SELECT new->>'autopatch_enabled' FROM audit_log WHERE entity = 'ops_policy'"
        " AND actor = 'user:ada' AND (old->>'autopatch_enabled') IS DISTINCT FROM"
        " (new->>'autopatch_enabled') ORDER BY id"
    ).fetchall()
    assert switches == [("false",), ("true",)]

    # 8. The KPI page: two attempts executed, both successes, drawn against the targets.
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="KPIs").click()
    await page.wait_for_url(re.compile(r"/ops/kpis$"))
    success = page.get_by_role("heading", name=re.compile(r"^Autopatch success rate"))
    assert "100 %" in await success.inner_text()
    assert await page.locator("main svg").count() > 0
    await shots.take(page, "kpis")
    print(f"browser run: {time.monotonic() - started:.0f} s, {len(shots.taken)} screenshots")
