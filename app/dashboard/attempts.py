"""Attempt pages (every viewer): the history (/ops/attempts: status, plugin and incident
filters, newest first, as GET /api/ops/autopatch-attempts lists them) and one attempt
(/ops/attempts/{id}): its facts, its event log (written by a database trigger: who moved it,
as which database user) and whether the event log's hash chain verifies
(app/healing/queries.py's `attempt_proof`)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.core.models import ATTEMPT_STATUSES
from app.core.states import ATTEMPT_IN_FLIGHT
from app.dashboard.web import render, signed_in
from app.healing import queries as healing_queries
from app.healing.queries import AttemptProof, attempt_proof
from app.incidents import queries
from app.services import transaction

router = APIRouter(prefix="/ops", include_in_schema=False)

SHOWN = 200
REFRESH_S = 15


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value or "")
    except ValueError:
        return None


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in row.items()}


@router.get("/attempts")
async def attempt_list(request: Request) -> Response:
    who = await signed_in(request)
    q = request.query_params
    status = q.get("status") if q.get("status") in ATTEMPT_STATUSES else None
    plugin = (q.get("plugin") or "").strip()[:100] or None
    raw_incident = (q.get("incident") or "").strip()
    incident = _uuid(raw_incident) if raw_incident else None
    problem = (
        "The incident filter is not an incident id; it was left out."
        if raw_incident and incident is None
        else None
    )
    async with transaction(request) as session:
        items = await queries.list_attempts(
            session,
            incident_id=incident,
            plugin=plugin,
            status=status,
            limit=SHOWN,
            tenants=who.user.scope,
        )
    filters = {"status": status, "plugin": plugin, "incident": str(incident) if incident else None}
    active = {name: value for name, value in filters.items() if value}
    return await render(
        request,
        "attempts.html",
        who,
        {
            "items": items,
            "filters": filters,
            "statuses": ATTEMPT_STATUSES,
            "shown": SHOWN,
            "problem": problem,
            "refresh_url": "/ops/attempts?" + urlencode({**active, "refresh": "1"}),
            "refresh_s": REFRESH_S,
        },
    )


def verdict(proof: AttemptProof) -> str:
    """Whether the attempt's record is proven, in words."""
    if proof.verified:
        if proof.chain_verified:
            return "verified"
        return (
            "verified (the chain breaks later, at event"
            f" {proof.first_broken_event_id}, after this attempt's events)"
        )
    if not proof.events:
        return "NOT verified: no event is recorded for this attempt"
    if proof.first_broken_event_id is None:
        return "NOT verified"
    return f"NOT verified: first broken event {proof.first_broken_event_id}"


@router.get("/attempts/{attempt_id}")
async def attempt_page(attempt_id: str, request: Request) -> Response:
    who = await signed_in(request)
    key = _uuid(attempt_id)
    async with transaction(request) as session:
        attempt = (
            await healing_queries.attempt_facts(session, key, tenants=who.user.scope)
            if key
            else None
        )
        proof = await attempt_proof(session, key) if key and attempt else None
    if attempt is None or proof is None:
        return await render(
            request,
            "error.html",
            who,
            {"heading": "Not found", "message": "No such attempt."},
            status_code=404,
        )
    in_flight = attempt["status"] in ATTEMPT_IN_FLIGHT
    return await render(
        request,
        "attempt.html",
        who,
        {
            "a": _plain(attempt),
            "proof": proof,
            "verdict": verdict(proof),
            "refresh_url": f"/ops/attempts/{key}?refresh=1" if in_flight else None,
            "refresh_s": REFRESH_S,
        },
    )
