"""The policy page (/ops/policy): every viewer reads it; admins change it through
app/policy/service.py, as PUT /api/ops/policy does. The kill switch has its own form with a
confirmation step: the admin types DISABLE (or ENABLE) to flip it. The page also lists the
maintenance windows open now or to come, with a form to end one (operators, through
app/maintenance/service.py as POST /api/ops/maintenance-windows/{id}/end does), and the
history of policy changes from the audit log (SQL typed in psql included), with who made
them."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import Conflict, Invalid
from app.core.models import SEVERITIES
from app.dashboard.web import act, form_of, render, signed_in
from app.maintenance import service as maintenance
from app.maintenance.repository import WindowFilter
from app.maintenance.schemas import Window
from app.policy import repository, service
from app.policy.repository import POLICY_FIELDS
from app.policy.schemas import Policy, PolicyUpdate
from app.services import transaction

router = APIRouter(prefix="/ops", include_in_schema=False)

BACK = "/ops/policy"
INTEGER_FIELDS = (
    "canary_percent",
    "approvals_required",
    "approval_ttl_s",
    "max_concurrent_actions",
    "max_concurrent_actions_per_tenant",
    "cooldown_s",
)
SEVERITY_FIELDS = ("autopatch_max_severity", "approval_min_severity")
# The words the kill switch form asks for, by the state it moves to.
CONFIRM_WORD = {False: "DISABLE", True: "ENABLE"}
HISTORY_SHOWN = 50
WINDOWS_READ = 500


async def _open_windows(session: AsyncSession, scope: list[str] | None) -> list[Window]:
    """The windows open now, then those still to come (soonest first), of the reader's
    tenants (`scope`; None: every tenant)."""
    now = datetime.now(UTC)
    active = await maintenance.list_windows(
        session, WindowFilter(active=True, scope=scope), limit=WINDOWS_READ
    )
    others = await maintenance.list_windows(
        session, WindowFilter(active=False, scope=scope), limit=WINDOWS_READ
    )
    upcoming = sorted((w for w in others.items if w.starts_at > now), key=lambda w: w.starts_at)
    return [*sorted(active.items, key=lambda w: w.ends_at), *upcoming]


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _history_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One audit row as the page shows it: who, and each policy field it changed."""
    old, new = row["old"] or {}, row["new"] or {}
    changes = [
        f"{name}: {_shown(old.get(name))} → {_shown(new.get(name))}"
        for name in POLICY_FIELDS
        if row["action"] == "update" and old.get(name) != new.get(name)
    ]
    if row["action"] == "insert":
        changes = ["the policy row was created with the defaults"]
    elif row["action"] == "delete":
        changes = ["the policy row was deleted"]
    return {
        "at": row["at"],
        "actor": row["actor"],
        "db_user": row["db_user"],
        "application_name": row["application_name"],
        "changes": changes or ["no rule changed"],
    }


@router.get("/policy")
async def policy_page(request: Request) -> Response:
    who = await signed_in(request)
    scope = who.user.scope
    async with transaction(request) as session:
        # A tenant-scoped user sees their tenants in the whitelist, their windows, and not the
        # history (the whole fleet's whitelist changes).
        policy = service.seen_by(await service.read_policy(session), scope)
        windows = await _open_windows(session, scope)
        history = (
            await repository.policy_history(session, limit=HISTORY_SHOWN) if scope is None else []
        )
    return await render(
        request,
        "policy.html",
        who,
        {
            "policy": policy,
            "severities": SEVERITIES,
            "can_edit": who.user.can("admin"),
            "confirm_word": CONFIRM_WORD[not policy.autopatch_enabled],
            "windows": windows,
            "can_end_windows": who.user.can("operator"),
            "history": [_history_entry(row) for row in history],
            "history_shown": HISTORY_SHOWN,
            "scoped": scope is not None,
        },
    )


def _changes(form: dict[str, str], current: Policy) -> dict[str, Any]:
    """The form's fields that differ from the policy now, typed for PolicyUpdate."""
    changes: dict[str, Any] = {}
    for name in INTEGER_FIELDS:
        raw = form.get(name, "").strip()
        if raw == "":
            continue
        try:
            changes[name] = int(raw)
        except ValueError:
            raise Invalid(f"{name}: a whole number is needed", field=name) from None
    raw = form.get("min_confidence", "").strip()
    if raw:
        try:
            changes["min_confidence"] = float(raw)
        except ValueError:
            raise Invalid("min_confidence: a number from 0 to 1 is needed") from None
    for name in SEVERITY_FIELDS:
        if form.get(name):
            changes[name] = form[name]
    if "autopatch_whitelist" in form:
        changes["autopatch_whitelist"] = [
            tenant for tenant in re.split(r"[\s,]+", form["autopatch_whitelist"]) if tenant
        ]
    return {name: value for name, value in changes.items() if getattr(current, name) != value}


@router.post("/policy")
async def change_policy(request: Request) -> Response:
    who, form = await form_of(request, "admin")

    async def work(session: AsyncSession) -> str:
        current = await service.read_policy(session)
        if form.get("seen") != current.updated_at.isoformat():
            # Saving the whole form over a change made since would undo it unseen.
            raise Conflict(
                f"the policy was changed by {current.updated_by or 'someone'} since you"
                " loaded this page; look at it again, then save"
            )
        changes = _changes(form, current)
        if not changes:
            return "Nothing changed."
        await service.change_policy(
            session, PolicyUpdate.model_validate(changes), actor=f"user:{who.user.username}"
        )
        return "Policy saved: " + ", ".join(sorted(changes)) + " changed."

    return await act(request, who, BACK, work, failed="Not saved")


@router.post("/policy/kill-switch")
async def kill_switch(request: Request) -> Response:
    who, form = await form_of(request, "admin")

    async def work(session: AsyncSession) -> str:
        target = form.get("autopatch")
        if target not in ("on", "off"):
            raise Invalid("the form did not say whether to turn autopatch on or off")
        enable = target == "on"
        word = CONFIRM_WORD[enable]
        if form.get("confirm", "").strip() != word:
            raise Invalid(f"type {word} in the confirmation box to confirm", field="confirm")
        await service.change_policy(
            session, PolicyUpdate(autopatch_enabled=enable), actor=f"user:{who.user.username}"
        )
        if enable:
            return "Autopatch is ON: the loop may patch automatically within the policy."
        return "Autopatch is OFF (kill switch): no automatic change reaches a plugin."

    return await act(request, who, BACK, work)


@router.post("/policy/windows/{window_id}/end")
async def end_window(window_id: str, request: Request) -> Response:
    who, _ = await form_of(request, "operator")

    async def work(session: AsyncSession) -> str:
        window = await maintenance.end_window(
            session, window_id, actor=f"user:{who.user.username}", scope=who.user.scope
        )
        target = window.tenant_id or f"installation {window.installation_id}"
        return (
            f"Maintenance window for {target} ended at"
            f" {window.ends_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC."
        )

    return await act(request, who, BACK, work)
