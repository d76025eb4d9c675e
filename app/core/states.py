"""The healing loop's state machine, declared once: the statuses an incident and an attempt go
through, the actions a decision can name, and the groups of statuses the code asks about
(open, closed, in flight). Code and SQL use these; the migrations write the same lists out
literally (a migration is a snapshot of its day), and tests/test_state_machine.py proves
that the database's CHECK constraints and partial indexes still agree with them.

    incident:  detected -> deciding -> (blocked_by_policy | awaiting_approval) -> staging
               -> applying -> verifying -> resolved; rolling_back -> rolled_back;
               escalated (a human's turn) -> any closing status; failed, cancelled, ignored
    attempt:   pending -> staging -> applying -> verifying -> success | rolled_back | failed;
               cancelled (kill switch, manual cancel)

docs/architecture.md walks through who moves what."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class IncidentStatus(StrEnum):
    DETECTED = "detected"
    DECIDING = "deciding"
    AWAITING_APPROVAL = "awaiting_approval"
    BLOCKED_BY_POLICY = "blocked_by_policy"
    STAGING = "staging"
    APPLYING = "applying"
    VERIFYING = "verifying"
    ROLLING_BACK = "rolling_back"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    CANCELLED = "cancelled"
    IGNORED = "ignored"


class AttemptStatus(StrEnum):
    PENDING = "pending"
    STAGING = "staging"
    APPLYING = "applying"
    VERIFYING = "verifying"
    SUCCESS = "success"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"


class Action(StrEnum):
    """What a decision (the decision service's, the fallback's or an operator's) asks for.
    Only PATCH and ROLLBACK change an installation (CHANGES): they become attempts."""

    PATCH = "patch"
    ROLLBACK = "rollback"
    IGNORE = "ignore"
    ESCALATE = "escalate"
    RESOLVE = "resolve"  # manual actions only: ops say it is over


# Statuses in which an incident is over; every other status is open.
INCIDENT_CLOSED: tuple[IncidentStatus, ...] = (
    IncidentStatus.RESOLVED,
    IncidentStatus.ROLLED_BACK,
    IncidentStatus.FAILED,
    IncidentStatus.CANCELLED,
    IncidentStatus.IGNORED,
)
INCIDENT_OPEN: tuple[IncidentStatus, ...] = tuple(
    s for s in IncidentStatus if s not in INCIDENT_CLOSED
)
# An attempt that has not finished: at most one per installation (a unique partial index).
ATTEMPT_IN_FLIGHT: tuple[AttemptStatus, ...] = (
    AttemptStatus.PENDING,
    AttemptStatus.STAGING,
    AttemptStatus.APPLYING,
    AttemptStatus.VERIFYING,
)
ATTEMPT_FINISHED: tuple[AttemptStatus, ...] = tuple(
    s for s in AttemptStatus if s not in ATTEMPT_IN_FLIGHT
)
CHANGES: tuple[Action, ...] = (Action.PATCH, Action.ROLLBACK)


def sql_list(values: Iterable[str]) -> str:
    """A parenthesised SQL list of string literals, for `status IN ...` in raw statements:
    "('resolved', 'rolled_back')". Only for the fixed values above, never for input."""
    return "(" + ", ".join(f"'{v!s}'" for v in values) + ")"


INCIDENT_CLOSED_SQL = sql_list(INCIDENT_CLOSED)
INCIDENT_OPEN_SQL = sql_list(INCIDENT_OPEN)
ATTEMPT_IN_FLIGHT_SQL = sql_list(ATTEMPT_IN_FLIGHT)
