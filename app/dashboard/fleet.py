"""Fleet pages (every viewer): the installations (/ops/fleet: by tenant, plugin and version,
with last heartbeat, next expected, health and open incident; filters, keyset paging, counts
by health), one installation (/ops/fleet/{id}: recent heartbeats as small charts, version
history, known-good version) and the releases (/ops/releases: quarantine state and outcome
statistics per version). Read from app/plugins/queries.py and app/releases/repository.py;
no page shows an installation's secret (the reads do not select it)."""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.dashboard import charts
from app.dashboard.kpis import inline_svg
from app.dashboard.web import render, signed_in, text_field
from app.plugins import queries
from app.releases.repository import release_outcomes
from app.services import transaction

router = APIRouter(prefix="/ops", include_in_schema=False)

PAGE_SIZE = 50
REFRESH_S = 30
# What each health word means, beside its badge.
HEALTH_MEANING = {
    "ok": "heartbeats on time",
    "overdue": "the next heartbeat was expected before now",
    "incident": "an incident is open",
    "unseen": "registered, no heartbeat yet",
}


@router.get("/fleet")
async def fleet_page(request: Request) -> Response:
    who = await signed_in(request)
    q = request.query_params
    filters = {
        "tenant": text_field(q.get("tenant"), 200),
        "plugin": text_field(q.get("plugin"), 100),
        "version": text_field(q.get("version"), 128),
    }
    health = next((h for h in queries.HEALTHS if h == q.get("health")), None)
    problem = None
    after = None
    cursor = text_field(q.get("cursor"), 600)
    if cursor:
        try:
            after = queries.decode_fleet_cursor(cursor)
        except queries.BadFleetCursor as exc:
            problem = str(exc)
    async with transaction(request) as session:
        page = await queries.list_installations(
            session, **filters, health=health, after=after, limit=PAGE_SIZE, tenants=who.user.scope
        )
        counts = await queries.count_by_health(session, **filters, tenants=who.user.scope)
    active = {name: value for name, value in {**filters, "health": health}.items() if value}
    # A health link replaces the health filter and keeps the others.
    others = {name: value for name, value in filters.items() if value}
    next_page = (
        "?" + urlencode({**active, "cursor": queries.encode_fleet_cursor(page.next_after)})
        if page.next_after
        else None
    )
    return await render(
        request,
        "fleet.html",
        who,
        {
            "items": page.items,
            "filters": filters,
            "health": health,
            "healths": queries.HEALTHS,
            "meaning": HEALTH_MEANING,
            "counts": [(h, counts.get(h, 0)) for h in queries.HEALTHS],
            "total": sum(counts.values()),
            "health_link": lambda h: "?" + urlencode({**others, "health": h} if h else others),
            "next_page": next_page,
            "first_page": ("?" + urlencode(active)) if cursor else None,
            "refresh_url": "/ops/fleet?" + urlencode({**dict(q.items()), "refresh": "1"}),
            "refresh_s": REFRESH_S,
            "problem": problem,
        },
    )


@router.get("/fleet/{installation_id}")
async def installation_page(installation_id: str, request: Request) -> Response:
    who = await signed_in(request)
    try:
        key: uuid.UUID | None = uuid.UUID(installation_id)
    except ValueError:
        key = None
    async with transaction(request) as session:
        detail = (
            await queries.installation_detail(session, key, tenants=who.user.scope) if key else None
        )
    if detail is None:
        return await render(
            request,
            "error.html",
            who,
            {"heading": "Not found", "message": "No such installation."},
            status_code=404,
        )
    beats = detail.heartbeats
    return await render(
        request,
        "installation.html",
        who,
        {
            "d": detail,
            "i": detail.installation,
            "meaning": HEALTH_MEANING,
            "requests_chart": inline_svg(
                charts.heartbeat_chart("Requests per heartbeat", beats, ("requests",))
            ),
            "errors_chart": inline_svg(
                charts.heartbeat_chart(
                    "Errors and webhook failures per heartbeat",
                    beats,
                    ("errors", "webhook_failures"),
                )
            ),
            "latest": beats[-1] if beats else None,
            "refresh_url": f"/ops/fleet/{key}?refresh=1",
            "refresh_s": REFRESH_S,
        },
    )


@router.get("/releases")
async def releases_page(request: Request) -> Response:
    who = await signed_in(request)
    plugin = text_field(request.query_params.get("plugin"), 100)
    async with transaction(request) as session:
        releases = await release_outcomes(session, plugin, tenants=who.user.scope)
    return await render(
        request,
        "releases.html",
        who,
        {
            "releases": releases,
            "plugin": plugin,
            "percent": lambda v: "n/a" if v is None else charts.percent(v),
        },
    )
