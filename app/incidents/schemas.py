"""What the ops read API answers about incidents, their attempts and the KPIs
(docs/contracts.md, "Ops API"): the OpenAPI document describes every field from these.

The attempt's read model lives here, not in app/healing, because an incident's detail embeds
its attempts and app/incidents cannot import app/healing (healing imports incidents)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from app.core.models import IncidentType, Severity
from app.core.states import Action, AttemptStatus, IncidentStatus


class Incident(BaseModel):
    id: uuid.UUID
    # None for a fleet incident: it groups the installations' incidents (its `members`).
    installation_id: uuid.UUID | None
    tenant_id: str | None
    plugin_name: str
    plugin_version: str | None
    type: IncidentType
    severity: Severity
    status: IncidentStatus
    status_reason: str | None
    first_bad_signal_at: datetime | None
    detected_at: datetime
    resolved_at: datetime | None
    occurrences: int
    updated_at: datetime
    fleet_incident_id: uuid.UUID | None
    # Set while the installation's heartbeats are missing (a heartbeat_missed incident open):
    # the healing loop leaves this incident alone until they return (README, "Ops API").
    muted_at: datetime | None = None


class IncidentList(BaseModel):
    items: list[Incident]
    # Pass it as `cursor` for the next page; None on the last page.
    next_cursor: str | None


class Attempt(BaseModel):
    id: uuid.UUID
    incident_id: uuid.UUID | None
    installation_id: uuid.UUID | None
    action: Action
    from_version: str | None
    to_version: str | None
    status: AttemptStatus
    decision_source: str | None
    confidence: float | None
    requested_by: str | None
    created_at: datetime
    executed_at: datetime | None
    finished_at: datetime | None
    failure_reason: str | None
    rollback_reason: str | None
    rolled_back_at: datetime | None


class AttemptList(BaseModel):
    items: list[Attempt]


class Approval(BaseModel):
    id: uuid.UUID
    username: str
    action_key: str
    comment: str | None
    created_at: datetime
    expires_at: datetime


class TimelineEntry(BaseModel):
    at: datetime
    event: str
    # Who, where the event has a person or process behind it (an approval, an attempt's move).
    by: str | None = None


class IncidentDetail(Incident):
    telemetry_snapshot: dict[str, Any]
    # The decision as recorded: the decision service's answer or the fallback's.
    sira_decision: dict[str, Any] | None
    # The action waiting for the policy gate or approvals (app/healing/pending.py).
    pending_action: dict[str, Any] | None
    # What an approval of the pending action names (ApproveBody.action_key).
    pending_action_key: str | None
    decided_at: datetime | None
    escalated_at: datetime | None
    next_check_at: datetime | None
    # A fleet incident's member incidents (at most FLEET_MEMBERS_SHOWN); absent otherwise.
    members: list[Incident] | None = None
    attempts: list[Attempt]
    approvals: list[Approval]
    timeline: list[TimelineEntry]


class Kpis(BaseModel):
    window_days: int
    attempts: int
    success_rate: float | None
    rollback_rate: float | None
    incidents: int
    mttd_s: float | None
    mttr_s: float | None
    incidents_by_severity_24h: dict[str, int]
    # Added for the dashboard; the fields above keep their meaning. MTTR over the incidents
    # the loop healed or rolled back (resolved or rolled_back, with an attempt); mttr_s
    # counts every incident closed in the window.
    mttr_loop_s: float | None = None
    loop_closed_incidents: int = 0
    # Means over the window's incidents that got votes (queries.time_to_approval).
    time_to_first_approval_s: float | None = None
    time_to_quorum_s: float | None = None


# --- KPIs for the dashboard's charts (app/incidents/queries.py) ---------------------------
# Rates are percentages (0-100), durations seconds, confidences 0-1, like `Kpis`.


class SeverityPoint(BaseModel):
    start: datetime  # the bucket's start (UTC, truncated to the hour or the day)
    counts: dict[str, int]  # every severity, 0 included
    total: int


class SeveritySeries(BaseModel):
    bucket: str  # "hour" or "day"
    points: list[SeverityPoint]  # oldest first, the current bucket last, no gaps


class KpiPoint(BaseModel):
    start: datetime  # the UTC day
    attempts: int  # executed that day
    success_rate: float | None
    rollback_rate: float | None
    mttd_s: float | None  # over the incidents detected that day
    mttr_loop_s: float | None  # idem, those the loop healed or rolled back


class KpiSeries(BaseModel):
    points: list[KpiPoint]  # oldest first, today last, no gaps


class TimeToApproval(BaseModel):
    incidents: int  # incidents of the window with at least one vote after their wait began
    first_vote_mean_s: float | None
    first_vote_median_s: float | None
    quorum_incidents: int  # of those, the ones whose votes on one action reached the quorum
    quorum_mean_s: float | None
    quorum_median_s: float | None
    approvals_required: int  # the quorum counted: today's policy value


class ConfidenceBucket(BaseModel):
    lower: float  # the bucket is [lower, upper); the last one includes 1.0
    upper: float
    count: int
    by_source: dict[str, int]  # sira, fallback (or another recorded source)
    by_action: dict[str, int]  # patch, rollback, ignore, escalate


class ConfidenceDistribution(BaseModel):
    total: int  # decisions with a numeric confidence
    without_confidence: int  # decisions recorded without one
    buckets: list[ConfidenceBucket]  # always 10, 0.0-0.1 ... 0.9-1.0


class CalibrationBucket(BaseModel):
    lower: float
    upper: float
    attempts: int  # finished attempts: success, failed or rolled_back
    successes: int
    predicted: float | None  # mean confidence of those attempts
    actual: float | None  # successes / attempts (0-1)


class CalibrationSeries(BaseModel):
    source: str  # "sira" or "fallback"
    buckets: list[CalibrationBucket]  # always 10; empty buckets have attempts 0, None values


class Calibration(BaseModel):
    series: list[CalibrationSeries]  # sira first, then fallback
