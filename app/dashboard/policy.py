"""The policy page (/ops/policy): every viewer reads it; admins change it through
app/policy/service.py, as PUT /api/ops/policy does. The kill switch has its own form with a
confirmation step: the admin types DISABLE (or ENABLE) to flip it."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import Conflict, Invalid
from app.core.models import SEVERITIES
from app.dashboard.web import act, form_of, render, signed_in
from app.policy import service
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


@router.get("/policy")
async def policy_page(request: Request) -> Response:
    who = await signed_in(request)
    async with transaction(request) as session:
        policy = await service.read_policy(session)
    return await render(
        request,
        "policy.html",
        who,
        {
            "policy": policy,
            "severities": SEVERITIES,
            "can_edit": who.user.can("admin"),
            "confirm_word": CONFIRM_WORD[not policy.autopatch_enabled],
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
