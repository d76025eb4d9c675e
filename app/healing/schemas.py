"""What ops send to act on an incident, and what they get back (docs/contracts.md, "Ops API")."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core import names
from app.core.states import Action, IncidentStatus

ManualAction = Literal["patch", "rollback", "ignore", "resolve", "escalate"]


class ApproveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: Annotated[str | None, Field(max_length=2000)] = None
    # The key of the action the approver saw (the incident's `pending_action_key`), required:
    # a vote binds to it, and a vote for an action that has changed since (another version,
    # or the same change tried again after a failed attempt) is refused (409).
    action_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ManualActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: ManualAction
    patch_version: Annotated[str | None, Field(max_length=128, pattern=names.VERSION_PATTERN)] = (
        None
    )
    comment: Annotated[str | None, Field(max_length=2000)] = None


class PendingActionOut(BaseModel):
    """The action an incident waits to take (app/healing/pending.py, as stored)."""

    action: Action
    to_version: str
    from_version: str | None
    automatic: bool
    requested_by: str
    source: str
    confidence: float | None
    comment: str | None


class Approved(BaseModel):
    incident_id: uuid.UUID
    action: PendingActionOut
    action_key: str
    # Valid votes for this exact action now, and how many the policy asks for.
    approvals: int
    approvals_required: int | None
    status: IncidentStatus


class ManualActionTaken(BaseModel):
    incident_id: uuid.UUID
    status: IncidentStatus
    # For patch and rollback: the action now waiting for the policy gate.
    action: PendingActionOut | None = None
