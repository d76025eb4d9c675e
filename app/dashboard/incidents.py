"""Incident pages: the list (/ops/incidents: filters, the API's keyset paging, counts by
severity, what happens next) and one incident (/ops/incidents/{id}: telemetry against the
installation's baseline, decision, pending action, approvals, timeline, attempts with their
staging report, commands and health verification) with its forms: approve and manual action,
which call app/healing/actions.py as the ops API does, and snooze, which opens a maintenance
window on the installation through app/maintenance/service.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import Conflict, Invalid, NotFound
from app.core.models import INCIDENT_STATUSES, INCIDENT_TYPES, SEVERITIES
from app.core.states import INCIDENT_CLOSED
from app.dashboard.sessions import SignedIn
from app.dashboard.web import act, choice, form_of, render, signed_in, text_field
from app.healing import actions
from app.healing import queries as healing_queries
from app.healing.schemas import ApproveBody, ManualActionBody
from app.incidents import queries
from app.maintenance import service as maintenance
from app.maintenance.schemas import WindowCreate
from app.plugins import queries as plugin_queries
from app.policy import service as policy_service
from app.services import transaction

router = APIRouter(prefix="/ops", include_in_schema=False)

PAGE_SIZE = 50
REFRESH_S = 15
MANUAL_ACTIONS = ("patch", "rollback", "ignore", "resolve", "escalate")

# What the healing loop does next, by status; the incident's status_reason says the rest.
NEXT_STEP = {
    "detected": "The healing loop will pick it up and decide what to do.",
    "deciding": "A decision is being made (decision service, or the fallback).",
    "awaiting_approval": "Waiting for operators' approval",
    "blocked_by_policy": "Held by the policy gate; checked again regularly",
    "staging": "Being tried in staging before it reaches the plugin",
    "applying": "Sent to the plugin; waiting for it to acknowledge",
    "verifying": "Applied; health is being verified",
    "rolling_back": "Rolling back; the rollback will be verified too",
    "escalated": "Escalated: an operator has to act (nothing happens on its own)",
}


BASELINE_HEARTBEATS = 10
# Heartbeats summed between the first bad signal and detection, at most.
DETECTION_HEARTBEATS = 100


def what_happens_next(status: str, reason: str | None, verify_until: datetime | None = None) -> str:
    """One honest line from the incident's status and status_reason (and, while verifying,
    the attempt's verification deadline)."""
    if status == "verifying" and verify_until is not None:
        return f"Applied; verifying health until {verify_until.astimezone(UTC):%H:%M:%S} UTC"
    if status in INCIDENT_CLOSED:
        return f"Nothing more: {status.replace('_', ' ')}" + (f" ({reason})" if reason else ".")
    line = NEXT_STEP.get(status, status)
    if reason and status not in ("detected", "deciding"):
        # The gate's reasons start "waiting: ", which the line already says.
        reason = reason.removeprefix("waiting: ")
        line = f"{line.rstrip('.')}: {reason}"
    return line


@router.get("/incidents")
async def incident_list(request: Request) -> Response:
    who = await signed_in(request)
    q = request.query_params
    filters = {
        "status": choice(q.get("status"), INCIDENT_STATUSES),
        "severity": choice(q.get("severity"), SEVERITIES),
        "type": choice(q.get("type"), INCIDENT_TYPES),
        "tenant": text_field(q.get("tenant"), 200),
        "plugin": text_field(q.get("plugin"), 100),
    }
    problem = None
    after = None
    cursor = text_field(q.get("cursor"), 400)
    if cursor:
        try:
            after = queries.decode_cursor(cursor)
        except queries.BadCursor as exc:
            problem = str(exc)
    async with transaction(request) as session:
        items = await queries.list_incidents(
            session,
            status=filters["status"],
            severity=filters["severity"],
            tenant=filters["tenant"],
            plugin=filters["plugin"],
            incident_type=filters["type"],
            after=after,
            limit=PAGE_SIZE,
            tenants=who.user.scope,
        )
        deadlines = await healing_queries.verify_deadlines(
            session, [item["id"] for item in items if item["status"] == "verifying"]
        )
        counts = await queries.count_by_severity(
            session,
            status=filters["status"],
            tenant=filters["tenant"],
            plugin=filters["plugin"],
            incident_type=filters["type"],
            tenants=who.user.scope,
        )
    active = {name: value for name, value in filters.items() if value}
    next_cursor = (
        queries.encode_cursor(items[-1]["detected_at"], items[-1]["id"])
        if len(items) == PAGE_SIZE
        else None
    )
    for item in items:
        item["next"] = what_happens_next(
            item["status"], item["status_reason"], deadlines.get(item["id"])
        )
    return await render(
        request,
        "incidents.html",
        who,
        {
            "items": items,
            "filters": filters,
            "counts": [(severity, counts.get(severity, 0)) for severity in SEVERITIES],
            "severities": SEVERITIES,
            "statuses": INCIDENT_STATUSES,
            "types": INCIDENT_TYPES,
            "next_page": "?" + urlencode({**active, "cursor": next_cursor})
            if next_cursor
            else None,
            "first_page": ("?" + urlencode(active)) if cursor else None,
            "severity_link": lambda severity: (
                "?" + urlencode({k: v for k, v in {**active, "severity": severity}.items() if v})
            ),
            "refresh_url": "/ops/incidents?" + urlencode({**dict(q.items()), "refresh": "1"}),
            "refresh_s": REFRESH_S,
            "problem": problem,
        },
    )


def _incident_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@router.get("/incidents/{incident_id}")
async def incident_page(incident_id: str, request: Request) -> Response:
    who = await signed_in(request)
    key = _incident_id(incident_id)
    async with transaction(request) as session:
        incident = (
            await queries.incident_detail(session, key, tenants=who.user.scope) if key else None
        )
        policy = await policy_service.read_policy(session)
        progress = await healing_queries.attempts_progress(session, key) if key and incident else {}
        baseline = at_detection = None
        if incident is not None and incident["installation_id"] is not None:
            first_bad = incident["first_bad_signal_at"]
            baseline = await plugin_queries.heartbeat_summary(
                session,
                incident["installation_id"],
                before=first_bad or incident["detected_at"],
                limit=BASELINE_HEARTBEATS,
            )
            if first_bad is not None:
                at_detection = await plugin_queries.heartbeat_summary(
                    session,
                    incident["installation_id"],
                    since=first_bad,
                    before=incident["detected_at"],
                    limit=DETECTION_HEARTBEATS,
                )
    if incident is None:
        return await render(
            request,
            "error.html",
            who,
            {"heading": "Not found", "message": "No such incident."},
            status_code=404,
        )
    now = datetime.now(UTC)
    pending_key = incident["pending_action_key"]
    votes = [
        a for a in incident["approvals"] if a["action_key"] == pending_key and a["expires_at"] > now
    ]
    verifying = [p for p in progress.values() if p.status == "verifying"]
    verify_until = verifying[-1].verify_deadline_at if verifying else None
    return await render(
        request,
        "incident.html",
        who,
        {
            "incident": incident,
            "next": what_happens_next(incident["status"], incident["status_reason"], verify_until),
            "votes": votes,
            "progress": progress,
            "baseline": baseline,
            "at_detection": at_detection,
            "baseline_size": BASELINE_HEARTBEATS,
            "approvals_required": policy.approvals_required,
            "approvable": incident["status"] in ("awaiting_approval", "blocked_by_policy")
            and incident["pending_action"] is not None,
            "closed": incident["status"] in INCIDENT_CLOSED,
            "manual_actions": MANUAL_ACTIONS,
            "can_act": who.user.can("operator"),
        },
    )


def _acting(who: SignedIn) -> actions.ActingUser:
    return actions.ActingUser(who.user.id, who.user.username, who.user.scope)


def _back(key: uuid.UUID | None) -> str:
    return f"/ops/incidents/{key}" if key else "/ops/incidents"


def _known(key: uuid.UUID | None) -> uuid.UUID:
    if key is None:
        raise NotFound("no such incident")
    return key


@router.post("/incidents/{incident_id}/approve")
async def approve(incident_id: str, request: Request) -> Response:
    who, form = await form_of(request, "operator")
    key = _incident_id(incident_id)

    async def work(session: AsyncSession) -> str:
        if not form.get("action_key"):
            raise Invalid("the form did not name the action to approve", field="action_key")
        body = ApproveBody.model_validate(
            {"comment": text_field(form.get("comment"), 2000), "action_key": form.get("action_key")}
        )
        done = await actions.approve(
            session, _known(key), _acting(who), body.comment, action_key=body.action_key
        )
        required = done.approvals_required
        return (
            f"Approved {done.action.action} to {done.action.to_version}:"
            f" {done.approvals} of {required if required is not None else '?'} approvals."
        )

    return await act(request, who, _back(key), work)


@router.post("/incidents/{incident_id}/act")
async def manual_action(incident_id: str, request: Request) -> Response:
    who, form = await form_of(request, "operator")
    key = _incident_id(incident_id)

    async def work(session: AsyncSession) -> str:
        body = ManualActionBody.model_validate(
            {
                "action": form.get("action"),
                "patch_version": text_field(form.get("patch_version"), 200),
                "comment": text_field(form.get("comment"), 2000),
            }
        )
        done = await actions.manual_action(
            session, _known(key), _acting(who), body.action, body.patch_version, body.comment
        )
        target = f" to {done.action.to_version}" if done.action else ""
        return f"Done: {body.action}{target}; the incident is now {done.status.value}."

    return await act(request, who, _back(key), work)


@router.post("/incidents/{incident_id}/snooze")
async def snooze(incident_id: str, request: Request) -> Response:
    """A maintenance window on the incident's installation from now: no new incident is
    opened for it meanwhile (the open one stays as it is)."""
    who, form = await form_of(request, "operator")
    key = _incident_id(incident_id)

    async def work(session: AsyncSession) -> str:
        incident = await queries.incident_detail(session, _known(key), tenants=who.user.scope)
        if incident is None:
            raise NotFound("no such incident")
        if incident["installation_id"] is None:
            raise Conflict("a fleet incident has no installation to snooze; snooze its members")
        try:
            minutes = int(form.get("minutes", ""))
        except ValueError:
            raise Invalid("minutes: a whole number is needed", field="minutes") from None
        body = WindowCreate.model_validate(
            {
                "installation_id": incident["installation_id"],
                "duration_s": minutes * 60,
                "reason": text_field(form.get("reason"), 500) or f"snoozed from incident {key}",
            }
        )
        window = await maintenance.create_window(
            session, body, actor=f"user:{who.user.username}", scope=who.user.scope
        )
        return (
            "Snoozed: no new incident for this installation until"
            f" {window.ends_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC."
        )

    return await act(request, who, _back(key), work)
