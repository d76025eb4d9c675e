"""What ops do to an incident through the API (or the dashboard): approve the action waiting
for approval, or ask for a manual action. A manual patch or rollback does not go around the
healing loop: it becomes the incident's pending action, marked as asked by the user, and the
loop takes it through the same policy gate (approvals, blast radius; not the automatic-only
rules), staging, apply, verify and rollback as any other."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

import app.releases.repository as releases
from app.core.db import set_actor
from app.core.errors import Conflict, Invalid, NotFound
from app.core.states import Action, IncidentStatus
from app.healing import repository as repo
from app.healing.pending import PendingAction
from app.healing.schemas import Approved, ManualAction, ManualActionTaken, PendingActionOut
from app.policy import repository as policy_repo
from app.policy.gate import (
    ProposedAction,
    record_approval,
    requester_username,
)
from app.policy.gate import (
    action_key as key_for,
)

# Open statuses without an attempt under way: an operator may take over.
TAKEOVER_STATUSES = ("detected", "deciding", "awaiting_approval", "blocked_by_policy", "escalated")
_APPROVABLE = ("awaiting_approval", "blocked_by_policy")


@dataclass(frozen=True, slots=True)
class ActingUser:
    id: uuid.UUID
    username: str
    # The tenants the user acts on (app/ops/security.py OpsUser.scope); None: every tenant.
    # Another tenant's incident is "no such incident" to them.
    tenants: list[str] | None = None

    @property
    def actor(self) -> str:
        return f"user:{self.username}"


async def _incident(session: AsyncSession, incident_id: uuid.UUID, user: ActingUser) -> Any:
    row = await repo.lock_incident_for_action(session, incident_id, tenants=user.tenants)
    if row is None:
        raise NotFound("no such incident")
    return row


def proposed_from_pending(
    *,
    incident_id: uuid.UUID,
    installation_id: uuid.UUID,
    tenant_id: str,
    plugin_name: str,
    severity: str,
    pending: PendingAction,
    generation: int,
    attempt_id: uuid.UUID | None = None,
) -> ProposedAction:
    """The gate's view of an incident's pending action (decided, or asked by an operator), in
    the incident's attempt generation (app/policy/gate.py, `ProposedAction.generation`)."""
    return ProposedAction(
        incident_id=incident_id,
        installation_id=installation_id,
        tenant_id=tenant_id,
        plugin_name=plugin_name,
        action=pending.action,
        from_version=pending.from_version,
        to_version=pending.to_version,
        severity=severity,
        confidence=pending.confidence,
        automatic=pending.automatic,
        requested_by=pending.requested_by,
        attempt_id=attempt_id,
        generation=generation,
    )


async def approve(
    session: AsyncSession,
    incident_id: uuid.UUID,
    user: ActingUser,
    comment: str | None,
    *,
    action_key: str,
) -> Approved:
    """One vote of `user` for the exact action the incident waits to take. `action_key`, the
    key of the action the approver saw (the incident detail's `pending_action_key`; the
    dashboard's form and the ops API both require it): a Conflict when the incident now
    waits for another action, or for the same change tried again after a failed attempt, so
    a vote never counts for something its voter did not see. The vote is stored under that
    key and counts for that action only."""
    await set_actor(session, user.actor)
    incident = await _incident(session, incident_id, user)
    pending = (
        None
        if incident.pending_action is None
        else PendingAction.from_json(incident.pending_action)
    )
    if incident.status not in _APPROVABLE or pending is None:
        raise Conflict(f"incident is {incident.status}; there is no action waiting for approval")
    proposed = proposed_from_pending(
        incident_id=incident.id,
        installation_id=incident.installation_id,
        tenant_id=incident.tenant_id,
        plugin_name=incident.plugin_name,
        severity=incident.severity,
        pending=pending,
        generation=incident.attempt_generation,
    )
    key = key_for(proposed)
    if action_key != key:
        retry = (
            f", after {incident.attempt_generation} attempt(s) that ended"
            if incident.attempt_generation
            else ""
        )
        raise Conflict(
            "the action waiting for approval has changed since you saw it (it is now"
            f" {pending.action} to {pending.to_version}{retry}); look again and approve"
            " that one",
            field="action_key",
        )
    # ApprovalRefused (a vote that cannot count) is a Refused: the caller's to answer.
    await record_approval(session, incident.id, user.id, proposed, comment=comment)
    # A plain read: only the gate share-locks the policy (see app/policy/gate.py on why).
    policy = await policy_repo.approvals_required(session)
    have = (
        await policy_repo.count_valid_approvals(
            session,
            incident.id,
            key,
            now=policy.now,
            requester_username=requester_username(proposed.requested_by),
        )
        if policy
        else 0
    )
    await repo.move_incident(session, incident.id, expected=incident.status, next_check_in_s=0)
    return Approved(
        incident_id=incident.id,
        action=PendingActionOut.model_validate(pending.as_json()),
        action_key=key,
        approvals=have,
        approvals_required=policy.approvals_required if policy else None,
        status=incident.status,
    )


async def manual_action(
    session: AsyncSession,
    incident_id: uuid.UUID,
    user: ActingUser,
    action: ManualAction,
    patch_version: str | None,
    comment: str | None,
) -> ManualActionTaken:
    await set_actor(session, user.actor)
    incident = await _incident(session, incident_id, user)
    if incident.status not in TAKEOVER_STATUSES:
        raise Conflict(
            f"incident is {incident.status}; "
            + (
                "an attempt is under way (cancel it first)"
                if incident.status
                in (
                    IncidentStatus.STAGING,
                    IncidentStatus.APPLYING,
                    IncidentStatus.VERIFYING,
                    IncidentStatus.ROLLING_BACK,
                )
                else "it is closed"
            ),
        )
    note = f" ({comment})" if comment else ""
    if action in ("ignore", "resolve", "escalate"):
        status = {"ignore": "ignored", "resolve": "resolved", "escalate": "escalated"}[action]
        await repo.move_incident(
            session,
            incident.id,
            expected=incident.status,
            status=status,
            reason=f"{action} by {user.actor}{note}",
        )
        return ManualActionTaken(incident_id=incident.id, status=IncidentStatus(status))
    if incident.installation_id is None:
        raise Conflict("a fleet incident has no installation to patch; act on its members")
    version = patch_version or (incident.previous_version if action == "rollback" else None)
    if not version:
        raise Invalid(
            "patch_version is required"
            + (
                " (the installation has no known-good or previous version to go back to)"
                if action == "rollback"
                else ""
            ),
            field="patch_version",
        )
    if version == incident.current_version:
        raise Invalid(f"the installation already runs {version}", field="patch_version")
    # A rollback to the installation's known-good version needs no signed release: the plugin
    # goes back to a version it ran healthy and holds. Any other version, "rollback" or not,
    # is staged and applied like a patch, from a signed release.
    staged = action == "patch" or version != incident.known_good_version
    if staged and await releases.command_payload(session, incident.plugin_name, version) is None:
        raise Invalid(
            f"no signed release of {incident.plugin_name} {version}"
            + (
                f" ({version} is not this installation's known-good version"
                f" ({incident.known_good_version or 'none yet'}), so the rollback is staged"
                " like a patch)"
                if action == "rollback"
                else ""
            )
            + " (add it with `selfheal release add`)",
            field="patch_version",
        )
    pending = PendingAction(
        action=Action(action),
        to_version=version,
        from_version=incident.current_version,
        automatic=False,
        requested_by=user.actor,
        source="manual",
        comment=comment,
    )
    await repo.move_incident(
        session,
        incident.id,
        expected=incident.status,
        status=IncidentStatus.BLOCKED_BY_POLICY,
        reason=f"{action} to {version} asked by {user.actor}{note}; waiting for the policy gate",
        next_check_in_s=0,
        pending_action=pending,
    )
    return ManualActionTaken(
        incident_id=incident.id,
        status=IncidentStatus.BLOCKED_BY_POLICY,
        action=PendingActionOut.model_validate(pending.as_json()),
    )
