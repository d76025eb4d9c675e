"""The policy gate: may this production-changing action go ahead now?

Every step that changes production (queueing an update or rollback command, automatic or asked
for by an operator) calls `evaluate()` inside the transaction that creates the command, and
creates it only when the result is `allowed`; otherwise the incident waits with
`result.reasons`. The caller owns the session and the transaction; the gate only reads, apart
from the locks below.

Rules, each adding one human-readable reason when it blocks (all are reported, not the first):

- Automatic actions only:
  - kill switch: `ops_policy.autopatch_enabled` must be true;
  - tenant whitelist: the tenant must be in `autopatch_whitelist` (empty = no tenant);
  - severity cap: the incident's severity must be at most `autopatch_max_severity`
    (low < medium < high < critical);
  - confidence: the decision's confidence must be given and at least `min_confidence`;
  - canary share: `tenant_in_canary(tenant, canary_percent)`, see there;
  - cooldown: no attempt on the same installation started, executed, ended or was rolled back
    less than `cooldown_s` ago, so a plugin cannot oscillate between patch and rollback.
- All actions, automatic and manual:
  - the installation exists and belongs to the action's tenant;
  - blast radius: fewer than `max_concurrent_actions` attempts in flight (pending, staging,
    applying, verifying) fleet-wide, and fewer than `max_concurrent_actions_per_tenant` on the
    tenant's installations; and no other attempt in flight on the same installation;
  - approvals: when the major version changes (semver major of from/to differs, or a version
    cannot be read) or the severity is at least `approval_min_severity`, `approvals_required`
    distinct approvers must have approved this exact action (`action_key`) with an unexpired
    vote; an approver is an enabled operator or admin who is not the requester. The exact
    action includes its attempt generation: after an attempt of the incident failed (or
    reached production and ended), trying the same change again needs new votes.

Decisions:
- The kill switch stops automatic actions only. Autopatch is off by default and
  docs/contracts.md has incidents wait "blocked, for ops" while it is off, so a manual action
  (an operator asked) must still be possible with it off; it goes through the blast-radius caps and approvals.
- The time-based cooldown applies to automatic actions only: it stands in for the human who
  would notice a plugin flapping between versions. An operator may roll back a patch that
  went out ten minutes ago; they may not start a second action on an installation that still
  has one in flight.
- A later step of an existing attempt passes `attempt_id`, so that attempt does not count
  against its own caps and cooldown.

Locking and transactions (expects READ COMMITTED, PostgreSQL's default):
- The policy row is read `FOR SHARE`: a concurrent `UPDATE ops_policy SET autopatch_enabled =
  false WHERE id = 1` either commits first (the read waits for it and sees the new row) or
  waits until the caller's transaction, command included, has committed. A lock wait longer
  than the connection's statement_timeout fails the read, and the gate fails closed.
- Evaluations serialise on one transaction-level advisory lock, taken before the policy read
  and held until the caller commits, so two concurrent evaluations cannot both take the last
  slot under a cap, and only one transaction at a time holds the policy's share lock (share
  locks that overlap without end would starve the kill switch's UPDATE). Call
  `evaluate()` before writing to plugin_autopatch_attempts in the transaction: the attempt
  event-log trigger takes its own advisory lock, and taking the two in the opposite order in
  two transactions is a deadlock.
- The gate runs inside a SAVEPOINT: if the policy cannot be read (the row is missing, or any
  database error), the result is "not allowed" with the reason, and the caller's transaction
  is still usable to record why the incident waits. The locks taken are kept until the
  caller's transaction ends."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import orjson
import structlog
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import Refused
from app.core.models import SEVERITIES
from app.core.states import Action
from app.policy import repository
from app.policy.repository import PolicySnapshot

log = structlog.get_logger("selfheal.policy")

APPROVER_ROLES = ("operator", "admin")
_SEVERITY_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}
_MAJOR = re.compile(r"^\s*[vV]?(\d+)")


@dataclass(frozen=True, slots=True)
class ProposedAction:
    incident_id: uuid.UUID
    installation_id: uuid.UUID
    tenant_id: str
    plugin_name: str
    action: Action  # PATCH or ROLLBACK (states.CHANGES)
    from_version: str | None
    to_version: str
    severity: str
    confidence: float | None
    automatic: bool
    # "user:<username>" when an operator asked; anything else (e.g. "worker") otherwise.
    requested_by: str
    # Set when gating a later step of an attempt that already exists.
    attempt_id: uuid.UUID | None = None
    # How many of the incident's attempts have ended in production or failed (success,
    # failed, rolled_back, or cancelled after it was executed): the retry after a failed
    # attempt is a new action, and the votes for the one before do not count for it.
    # `repository.attempt_generation_sql` computes it.
    generation: int = 0

    def __post_init__(self) -> None:
        if self.action not in ("patch", "rollback"):
            raise ValueError(f"action must be patch or rollback, not {self.action!r}")
        if self.severity not in _SEVERITY_RANK:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        if self.confidence is not None and not 0 <= self.confidence <= 1:
            raise ValueError("confidence must be between 0 and 1")
        if not self.to_version:
            raise ValueError("to_version is required")
        if self.generation < 0:
            raise ValueError("generation must not be negative")


@dataclass(frozen=True, slots=True)
class GateResult:
    allowed: bool
    reasons: tuple[str, ...]
    needs_approval: bool
    approvals_have: int
    approvals_need: int
    action_key: str
    # The kill switch alone would block this (automatic) action: attempts not yet applied are
    # cancelled rather than kept waiting.
    kill_switch: bool = False

    @property
    def waits_for_approval_only(self) -> bool:
        """Blocked by missing approvals and by nothing else."""
        return (
            self.needs_approval
            and self.approvals_have < self.approvals_need
            and (len(self.reasons) == 1)
        )

    @property
    def summary(self) -> str:
        """The reasons as one line, for an incident's status_reason."""
        return "; ".join(self.reasons) if self.reasons else "allowed"


class ApprovalRefused(Refused):
    """A vote that cannot count: by the requester, a viewer, a disabled or unknown user."""


def action_key(action: ProposedAction) -> str:
    """A stable hash of what exactly would be done: incident, installation, action, from and
    to version, and the attempt generation. An approval carries it, so it counts for that
    action only: a different target version is a different action and needs its own
    approvals, and so is the same action tried again after an attempt that failed."""
    return key_of(
        action.incident_id,
        action.installation_id,
        action.action,
        action.from_version,
        action.to_version,
        action.generation,
    )


def key_of(
    incident_id: uuid.UUID,
    installation_id: uuid.UUID | None,
    action: str,
    from_version: str | None,
    to_version: str | None,
    generation: int,
) -> str:
    """`action_key` from its parts, for the readers that hold an incident's stored pending
    action rather than a ProposedAction (the ops API's incident detail, the dashboard).
    v2: v1 keys had no generation; votes stored under them match no action any more."""
    bound = [
        "v2",
        str(incident_id),
        str(installation_id),
        action,
        from_version,
        to_version,
        generation,
    ]
    return hashlib.sha256(orjson.dumps(bound)).hexdigest()


def canary_bucket(tenant_id: str) -> int:
    """The tenant's fixed place, 0..99, in the canary order: sha256 of the tenant id (UTF-8) as
    a big-endian integer, modulo 100. It never changes, so a tenant is always in or always out
    at a given share, and raising canary_percent only adds tenants."""
    return int.from_bytes(hashlib.sha256(tenant_id.encode()).digest(), "big") % 100


def tenant_in_canary(tenant_id: str, canary_percent: int) -> bool:
    return canary_bucket(tenant_id) < canary_percent


def requester_username(requested_by: str) -> str | None:
    prefix, sep, username = requested_by.partition(":")
    return username if sep and prefix == "user" and username else None


async def evaluate(
    session: AsyncSession, action: ProposedAction, *, now: datetime | None = None
) -> GateResult:
    """Evaluate every rule for `action` in the caller's transaction (see the module docstring).
    `now` defaults to the transaction's clock; tests pass one to check expiries and cooldowns."""
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    key = action_key(action)
    try:
        async with session.begin_nested():
            return await _evaluate(session, action, key, now)
    except SQLAlchemyError as exc:
        log.warning("policy_gate_failed_closed", incident_id=str(action.incident_id), exc_info=True)
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        return _closed(key, f"the ops policy could not be checked ({detail}); failing closed")


async def record_approval(
    session: AsyncSession,
    incident_id: uuid.UUID,
    user_id: uuid.UUID,
    action: ProposedAction,
    comment: str | None = None,
    ttl_s: int | None = None,
) -> None:
    """Record `user_id`'s vote for exactly `action` (one per incident, user and action; voting
    again renews it). `ttl_s` defaults to the policy's approval_ttl_s. Raises ApprovalRefused
    for a vote that could never count."""
    if incident_id != action.incident_id:
        raise ApprovalRefused(
            f"the action belongs to incident {action.incident_id}, not {incident_id}"
        )
    voter = await repository.read_voter(session, user_id)
    if voter is None:
        raise ApprovalRefused(f"no ops user {user_id}")
    if voter.disabled:
        raise ApprovalRefused(f"user {voter.username} is disabled")
    if voter.role not in APPROVER_ROLES:
        raise ApprovalRefused(
            f"user {voter.username} is a {voter.role}; approving needs the operator or admin role"
        )
    if requester_username(action.requested_by) == voter.username:
        raise ApprovalRefused(
            f"user {voter.username} requested this action and cannot approve it;"
            " another operator must"
        )
    if ttl_s is None:
        ttl_s = await repository.read_approval_ttl_s(session)
        if ttl_s is None:
            raise ApprovalRefused("the ops policy row is missing; cannot tell how long votes last")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    await repository.upsert_approval(
        session, incident_id, user_id, action_key(action), comment, ttl_s
    )


def _closed(key: str, reason: str) -> GateResult:
    return GateResult(
        allowed=False,
        reasons=(reason,),
        needs_approval=False,
        approvals_have=0,
        approvals_need=0,
        action_key=key,
    )


async def _evaluate(
    session: AsyncSession, action: ProposedAction, key: str, now: datetime | None
) -> GateResult:
    # The advisory lock first, then the share lock on the policy row: at most one gate
    # transaction holds the share lock at a time. Share locks taken by overlapping transactions
    # would otherwise starve the kill switch's UPDATE (PostgreSQL lets a new share locker in
    # past a waiting updater), and `UPDATE ops_policy ...` typed in psql could wait forever
    # while workers keep gating. See tests/test_healing_workers.py.
    await repository.serialize_gate_decisions(session)
    policy = await repository.read_policy_for_share(session)
    if policy is None:
        return _closed(key, "the ops_policy row (id = 1) is missing; failing closed")
    now = now or policy.now
    reasons: list[str] = []
    if action.automatic:
        reasons += _automatic_rule_reasons(action, policy)
    reasons += await _blast_radius_reasons(session, action, policy, now)

    approval_reasons = _approval_triggers(action, policy)
    need = policy.approvals_required if approval_reasons else 0
    have = 0
    if need:
        have = await repository.count_valid_approvals(
            session,
            action.incident_id,
            key,
            now=now,
            requester_username=requester_username(action.requested_by),
        )
        if have < need:
            why = " and ".join(approval_reasons)
            reasons.append(f"needs {need} approvals from distinct operators ({why}); has {have}")
    return GateResult(
        allowed=not reasons,
        reasons=tuple(reasons),
        needs_approval=bool(need),
        approvals_have=have,
        approvals_need=need,
        action_key=key,
        kill_switch=action.automatic and not policy.autopatch_enabled,
    )


def _automatic_rule_reasons(action: ProposedAction, policy: PolicySnapshot) -> list[str]:
    reasons = []
    if not policy.autopatch_enabled:
        reasons.append("autopatch is disabled (kill switch)")
    if action.tenant_id not in policy.autopatch_whitelist:
        reasons.append(
            f"tenant {action.tenant_id} is not in the autopatch whitelist"
            + (" (the whitelist is empty)" if not policy.autopatch_whitelist else "")
        )
    if _SEVERITY_RANK[action.severity] > _SEVERITY_RANK[policy.autopatch_max_severity]:
        reasons.append(
            f"severity {action.severity} is above the autopatch cap"
            f" ({policy.autopatch_max_severity})"
        )
    if action.confidence is None:
        reasons.append("the decision has no confidence; automatic actions need one")
    # Decimal(str(...)): compare the decimal the decision shows, not the float's binary value.
    elif Decimal(str(action.confidence)) < policy.min_confidence:
        reasons.append(
            f"confidence {action.confidence} is below the minimum ({policy.min_confidence})"
        )
    if not tenant_in_canary(action.tenant_id, policy.canary_percent):
        reasons.append(
            f"tenant {action.tenant_id} is outside the canary share"
            f" ({policy.canary_percent}%; its bucket is {canary_bucket(action.tenant_id)})"
        )
    return reasons


async def _blast_radius_reasons(
    session: AsyncSession, action: ProposedAction, policy: PolicySnapshot, now: datetime
) -> list[str]:
    reasons = []
    tenant = await repository.installation_tenant(session, action.installation_id)
    if tenant is None:
        reasons.append(f"installation {action.installation_id} does not exist")
    elif tenant != action.tenant_id:
        reasons.append(
            f"installation {action.installation_id} belongs to tenant {tenant},"
            f" not {action.tenant_id}"
        )
    counts = await repository.count_in_flight_attempts(
        session, action.tenant_id, excluding=action.attempt_id
    )
    if counts.fleet >= policy.max_concurrent_actions:
        reasons.append(
            f"{_actions(counts.fleet)} in flight fleet-wide"
            f" (max_concurrent_actions is {policy.max_concurrent_actions})"
        )
    if counts.tenant >= policy.max_concurrent_actions_per_tenant:
        reasons.append(
            f"{_actions(counts.tenant)} in flight for tenant {action.tenant_id}"
            f" (max_concurrent_actions_per_tenant is {policy.max_concurrent_actions_per_tenant})"
        )
    if await repository.installation_has_attempt_in_flight(
        session, action.installation_id, excluding=action.attempt_id
    ):
        reasons.append("another attempt on this installation is still in flight")
    elif action.automatic and policy.cooldown_s:
        last = await repository.last_attempt_activity(
            session, action.installation_id, excluding=action.attempt_id
        )
        if last is not None and now < last + timedelta(seconds=policy.cooldown_s):
            until = last + timedelta(seconds=policy.cooldown_s)
            reasons.append(
                f"cooldown: the last attempt on this installation was active at"
                f" {last.isoformat()}; automatic actions wait until {until.isoformat()}"
                f" (cooldown_s is {policy.cooldown_s})"
            )
    return reasons


def _approval_triggers(action: ProposedAction, policy: PolicySnapshot) -> list[str]:
    triggers = []
    from_major = _major(action.from_version)
    to_major = _major(action.to_version)
    if from_major is None or to_major is None:
        triggers.append(
            f"the version change {action.from_version} -> {action.to_version} cannot be classified"
        )
    elif from_major != to_major:
        triggers.append(f"major version change {action.from_version} -> {action.to_version}")
    if _SEVERITY_RANK[action.severity] >= _SEVERITY_RANK[policy.approval_min_severity]:
        triggers.append(f"severity {action.severity}")
    return triggers


def _actions(count: int) -> str:
    return "1 action is" if count == 1 else f"{count} actions are"


def _major(version: str | None) -> int | None:
    match = _MAJOR.match(version or "")
    return int(match.group(1)) if match else None
