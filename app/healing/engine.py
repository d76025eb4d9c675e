"""The healing loop: one incident at a time, one short guarded transaction per step.

    detected -> deciding -> (ignored | escalated | awaiting_approval | blocked_by_policy | staging)
    staging -> applying -> verifying -> resolved
                                     -> rolling_back -> rolled_back (or escalated, critical)
    any step -> escalated (a human must look) ; staging/applying -> blocked_by_policy when the
    kill switch is engaged before the change reached the plugin (the attempt ends cancelled)

Who runs it: each detection tick claims the incidents that are due (`repository.claim_due`:
next_check_at has passed, or a new incident) and leases them for SELFHEAL_HEAL_LEASE_S by
pushing next_check_at forward; `advance()` then runs steps until the incident has to wait
(for staging, the plugin, the health window, ops), and each step sets when to look again. A
worker that dies mid-step leaves the incident with an expired lease, and the next tick hands it
to another worker, which redoes the step from the database state: the reconciler is the lease.

Why every step is safe to run twice or concurrently:
- transitions are `UPDATE ... WHERE status = :expected` (repository.move_incident and
  move_attempt); the loser of a race changes nothing and stops;
- an incident has at most one attempt in flight, and an attempt at most one command of each
  type (unique indexes), so a repeated step cannot queue a second update;
- the policy gate runs in the transaction that creates the attempt and, again, in the one that
  creates the command, reading ops_policy FOR SHARE: the kill switch statement either commits
  before (and the step sees it) or waits until the step's transaction has committed.

HTTP calls (decision service, staging runner) happen outside transactions, each under its
own total deadline, so a slow service never holds a row lock.

Over 600 lines: one class, one step per incident status, and the steps share the incident
lock, the guarded moves and the notification and feedback calls; split across modules the
transaction boundaries (the point of this file) would no longer read in one place."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.settings import Settings
from app.core.states import Action, AttemptStatus, IncidentStatus
from app.decisions.client import DecisionClient
from app.decisions.schemas import Decision, Feedback, IncidentFacts, LocalEvidence
from app.healing import repository as repo
from app.healing.actions import proposed_from_pending
from app.healing.pending import PendingAction
from app.healing.repository import AttemptRow, IncidentState
from app.healing.staging import RunLost, StagingClient, StagingUnavailable
from app.incidents.rules import Sample, healthy_for, thresholds
from app.notifications.events import notify
from app.notifications.feedback import record_outcome
from app.plugins.repository import insert_command
from app.policy.gate import GateResult, ProposedAction, evaluate
from app.releases import repository as releases
from app.releases.artifacts import ArtifactCapabilities

log = structlog.get_logger("selfheal.healing")

MAX_STEPS_PER_RUN = 12

# The statuses in which an incident waits while its installation is silent (muted): nothing
# was started for it yet. From staging on, the attempt goes on: a change that reached the
# plugin has to be judged (verification treats silence as failure and rolls back), and one
# that cannot reach it fails as for any plugin that does not answer.
MUTABLE = (
    IncidentStatus.DETECTED,
    IncidentStatus.DECIDING,
    IncidentStatus.AWAITING_APPROVAL,
    IncidentStatus.BLOCKED_BY_POLICY,
)


class Superseded(Exception):
    """The incident moved on since the step read it; nothing was changed."""


@dataclass(frozen=True, slots=True)
class StepResult:
    again: bool  # run the next step now


CONTINUE = StepResult(True)
WAIT = StepResult(False)


class Healer:
    def __init__(
        self,
        maker: async_sessionmaker[AsyncSession],
        settings: Settings,
        decisions: DecisionClient,
        staging: StagingClient,
    ) -> None:
        self.maker = maker
        self.settings = settings
        self.decisions = decisions
        self.staging = staging
        self.artifacts = ArtifactCapabilities(settings.secret_key)
        self._steps: dict[str, Callable[[IncidentState], Awaitable[StepResult]]] = {
            "detected": self._detected,
            "deciding": self._deciding,
            "awaiting_approval": self._regate,
            "blocked_by_policy": self._regate,
            "staging": self._staging,
            "applying": self._applying,
            "verifying": self._verifying,
            "rolling_back": self._rolling_back,
        }

    @contextlib.asynccontextmanager
    async def _locked(self, state: IncidentState) -> AsyncIterator[AsyncSession]:
        """A step's transaction, holding the incident's row lock from its first statement and
        only while the incident is still in the status the step was chosen for: a run that
        read the incident before another run moved it changes nothing (Superseded) and looks
        again. Every step takes its locks in the same order (incident, gate, attempt history),
        so two runs on one incident queue up instead of deadlocking."""
        async with self.maker() as session, session.begin():
            if not await repo.lock_incident(session, state.id, state.status):
                raise Superseded(state.status)
            yield session

    # -- driving --------------------------------------------------------------------------

    async def claim_due(self, limit: int | None = None) -> list[uuid.UUID]:
        """Lease the incidents that are due; tenants and ops hear of new ones here, in the
        same transaction (at most SELFHEAL_HEAL_BATCH per tick, off detection's hot path)."""
        async with self.maker() as session, session.begin():
            claimed = await repo.claim_due(
                session,
                lease_s=self.settings.heal_lease_s,
                limit=min(limit or self.settings.heal_batch, self.settings.heal_batch),
            )
            fresh = [incident_id for incident_id, new in claimed if new]
            for incident in await repo.notification_fields(session, fresh) if fresh else []:
                await notify(session, "incident_opened", incident=incident)
        return [incident_id for incident_id, _ in claimed]

    async def advance(self, incident_id: uuid.UUID) -> str | None:
        """Run the incident's steps until it has to wait; its status at the end."""
        status = first = None
        for _ in range(MAX_STEPS_PER_RUN):
            async with self.maker() as session:
                state = await repo.load_state(session, incident_id)
            if state is None:
                return None
            status = state.status
            first = first or status
            step = self._steps.get(state.status)
            if step is None:
                return status
            try:
                if state.status in MUTABLE and (state.installation_silent or state.muted_at):
                    result = await self._muted(state)
                else:
                    result = await step(state)
            except Superseded:
                continue  # read it again
            except Exception:
                # The lease runs out and another run retries the step from the database.
                log.exception("healing_step_failed", incident_id=str(incident_id), status=status)
                return status
            if not result.again:
                break
        async with self.maker() as session:
            final = await repo.load_state(session, incident_id)
        if final is not None and final.status != first:
            # The one info line of the healing loop: an incident moved (the tick jobs
            # themselves say nothing while nothing happens).
            log.info(
                "incident_moved",
                incident_id=str(incident_id),
                plugin=final.plugin_name,
                type=final.type,
                status_from=first,
                status_to=final.status,
                reason=final.status_reason,
            )
        return final.status if final else status

    async def follow_sql_rollbacks(self) -> int:
        """Queue rollback commands for attempts marked rolled_back in SQL (the runbook's
        "rollback all recent patches"), as the operator who typed it expects."""
        queued = 0
        async with self.maker() as session, session.begin():
            for row in await repo.sql_rolled_back_without_command(session, limit=100):
                if row.from_version is None:
                    log.error("sql_rollback_without_version", attempt_id=str(row.id))
                    continue
                payload = await self._command_payload(
                    session, row.plugin_name, "rollback", row.from_version
                )
                assert payload is not None  # a rollback needs no release
                command_id = await insert_command(
                    session,
                    installation_id=row.installation_id,
                    attempt_id=row.id,
                    type="rollback",
                    payload=payload,
                    automatic=False,
                    ttl_s=self.settings.command_ttl_s,
                    max_deliveries=self.settings.command_max_deliveries,
                )
                queued += command_id is not None
        if queued:
            log.warning("sql_rollbacks_queued", commands=queued)
        return queued

    # -- steps ----------------------------------------------------------------------------

    async def _muted(self, state: IncidentState) -> StepResult:
        """A missed heartbeat mutes the installation's other open incidents: while its
        heartbeat_missed incident is open, detection opens no new one (its samples are left
        out), and the ones already open that nothing was started for are not decided, gated,
        escalated or notified: the missing heartbeats say everything, and no command could
        reach the plugin anyway. The incident is marked muted (muted_at) and looked at again
        every SELFHEAL_BLOCKED_RECHECK_S; once the heartbeat_missed incident is closed
        (heartbeats resumed), the mark is cleared and the loop goes on where it stopped."""
        if not state.installation_silent:
            async with self._locked(state) as session:
                moved = await repo.move_incident(
                    session,
                    state.id,
                    expected=state.status,
                    muted=False,
                    reason="heartbeats resumed; healing goes on",
                    next_check_in_s=self.settings.heal_lease_s,
                )
            return CONTINUE if moved else WAIT
        async with self._locked(state) as session:
            await repo.move_incident(
                session,
                state.id,
                expected=state.status,
                muted=True,
                reason=None
                if state.muted_at
                else "muted: the installation's heartbeats are missing (heartbeat_missed"
                " incident open); waiting for them to return",
                next_check_in_s=self.settings.blocked_recheck_s,
            )
        return WAIT

    async def _detected(self, state: IncidentState) -> StepResult:
        if state.installation_id is None:
            return await self._escalate(
                state,
                "detected",
                "fleet incident: many installations of one version share this problem;"
                " each installation's incident is handled on its own, this one needs a human",
            )
        if state.type == "heartbeat_missed":
            waited = (state.now - state.detected_at).total_seconds()
            if waited < self.settings.missed_decide_after_s:
                # Commands travel in heartbeat responses: give a silent installation time to
                # come back (detection resolves the incident when it does).
                return await self._look_again(state, self.settings.missed_decide_after_s - waited)
        async with self._locked(state) as session:
            moved = await repo.move_incident(
                session,
                state.id,
                expected=IncidentStatus.DETECTED,
                status=IncidentStatus.DECIDING,
                next_check_in_s=self.settings.heal_lease_s,
            )
        return CONTINUE if moved else WAIT

    async def _deciding(self, state: IncidentState) -> StepResult:
        assert state.installation_id is not None
        async with self.maker() as session:
            candidates = await releases.candidate_versions(
                session, state.plugin_name, exclude=state.current_version
            )
            # Never propose again what failed on this installation: a patch rolled back here
            # once would be rolled back again (patch/rollback oscillation).
            failed_here = await repo.versions_failed_on(session, state.installation_id)
            # Quarantined fleet-wide, or blocked for this tenant (_maybe_quarantine).
            quarantined = await releases.quarantined_versions(
                session, state.plugin_name, tenant_id=state.tenant_id
            )
            candidates = [
                version
                for version in candidates
                if version not in failed_here and version not in quarantined
            ]
            outcomes = await repo.outcome_stats(
                session,
                plugin_name=state.plugin_name,
                incident_type=state.type,
                tenant_id=state.tenant_id,
            )
        facts = IncidentFacts(
            id=str(state.id),
            type=state.type,
            severity=state.severity,
            plugin=state.plugin_name,
            current_version=state.current_version,
            previous_version=state.previous_version,
            detected_at=state.detected_at,
            tenant_id=state.tenant_id,
            telemetry_snapshot=state.telemetry_snapshot,
        )
        evidence = LocalEvidence(
            version_changed_at=state.version_changed_at,
            outcomes=outcomes,
            quarantined=quarantined,
        )
        decision = await self.decisions.decide(facts, candidates, evidence)
        return await self._record_decision(state, decision)

    async def _record_decision(self, state: IncidentState, decision: Decision) -> StepResult:
        record = decision.as_record()
        if decision.action == Action.IGNORE:
            async with self._locked(state) as session:
                await repo.move_incident(
                    session,
                    state.id,
                    expected=IncidentStatus.DECIDING,
                    status=IncidentStatus.IGNORED,
                    reason=f"decision ({decision.source}): ignore. {decision.explanation}",
                    sira_decision=record,
                    decided=True,
                )
            return WAIT
        if decision.action == Action.ESCALATE or decision.patch_version is None:
            async with self._locked(state) as session:
                moved = await repo.move_incident(
                    session,
                    state.id,
                    expected=IncidentStatus.DECIDING,
                    status=IncidentStatus.ESCALATED,
                    reason=f"decision ({decision.source}): escalate. {decision.explanation}",
                    sira_decision=record,
                    decided=True,
                )
                if moved:
                    await self._notify(session, "escalated", state, "escalated")
            return WAIT
        action = PendingAction(
            action=decision.action,
            to_version=decision.patch_version,
            from_version=state.current_version,
            automatic=True,
            requested_by="worker",
            source=decision.source,
            confidence=decision.confidence,
        )
        async with self._locked(state) as session:
            await repo.move_incident(
                session,
                state.id,
                expected=IncidentStatus.DECIDING,
                sira_decision=record,
                decided=True,
                pending_action=action,
                next_check_in_s=self.settings.heal_lease_s,
            )
            return await self._gate_and_start(session, state, "deciding", action)

    async def _regate(self, state: IncidentState) -> StepResult:
        action = state.pending_action
        if not action:
            return await self._escalate(state, state.status, "no action is waiting for the gate")
        if (
            state.status == IncidentStatus.BLOCKED_BY_POLICY
            and action.automatic
            and action.source == "fallback"
            and self.decisions.configured
            and self.decisions.breaker.state != "open"
        ):
            # Decided by our fallback while the decision service was away, and blocked (the
            # fallback is rarely confident enough): the service may answer again, so ask it
            # rather than wait for ops. While it stays down its breaker opens and stops this.
            async with self._locked(state) as session:
                await repo.move_incident(
                    session,
                    state.id,
                    expected=IncidentStatus.BLOCKED_BY_POLICY,
                    status=IncidentStatus.DECIDING,
                    reason="decided by the fallback while the decision service was away;"
                    " asking it again",
                    next_check_in_s=self.settings.heal_lease_s,
                    pending_action=None,
                )
            return CONTINUE
        if action.from_version != state.current_version:
            # The installation changed version while the action waited: it was decided for
            # another situation.
            if action.automatic:
                async with self._locked(state) as session:
                    await repo.move_incident(
                        session,
                        state.id,
                        expected=state.status,
                        status=IncidentStatus.DECIDING,
                        reason=f"the installation now runs {state.current_version}; deciding again",
                        next_check_in_s=self.settings.heal_lease_s,
                        pending_action=None,
                    )
                return CONTINUE
            return await self._escalate(
                state,
                state.status,
                f"the installation now runs {state.current_version}, not"
                f" {action.from_version}: the {action.action} asked by"
                f" {action.requested_by} no longer applies",
            )
        async with self._locked(state) as session:
            return await self._gate_and_start(session, state, state.status, action)

    async def _gate_and_start(
        self,
        session: AsyncSession,
        state: IncidentState,
        expected: str,
        action: PendingAction,
    ) -> StepResult:
        """In the caller's transaction (incident row locked): gate the action and start an
        attempt, or record why the incident waits."""
        assert state.installation_id is not None and state.tenant_id is not None
        to_version = action.to_version
        staged = not _skips_staging(state, action.action, to_version)
        if (
            await self._command_payload(
                session, state.plugin_name, action.action, to_version, staged=staged
            )
            is None
        ):
            unknown = (
                f" ({to_version} is not this installation's known-good version, so the"
                " rollback is staged like a patch)"
                if action.action == Action.ROLLBACK
                else ""
            )
            await repo.move_incident(
                session,
                state.id,
                expected=expected,
                status=IncidentStatus.ESCALATED,
                reason=f"no signed release of {state.plugin_name} {to_version} to"
                f" {action.action} to{unknown} (add one with `selfheal release add`)",
            )
            await self._notify(session, "escalated", state, "escalated")
            return WAIT
        if action.automatic and to_version in await releases.quarantined_versions(
            session, state.plugin_name, tenant_id=state.tenant_id
        ):
            await repo.move_incident(
                session,
                state.id,
                expected=expected,
                status=IncidentStatus.ESCALATED,
                reason=f"{state.plugin_name} {to_version} is quarantined (fleet-wide, or for"
                f" tenant {state.tenant_id}); not applied automatically",
            )
            await self._notify(session, "escalated", state, "escalated")
            return WAIT
        proposed = _proposed(state, action)
        gate = await evaluate(session, proposed)
        if not gate.allowed:
            status = "awaiting_approval" if gate.waits_for_approval_only else "blocked_by_policy"
            await repo.move_incident(
                session,
                state.id,
                expected=expected,
                status=status,
                reason=f"waiting: {gate.summary}",
                next_check_in_s=self.settings.blocked_recheck_s,
            )
            if status == "awaiting_approval" and state.status != IncidentStatus.AWAITING_APPROVAL:
                await self._notify(session, "approval_needed", state, status, gate.summary)
            return WAIT
        attempt_id = await repo.insert_attempt(
            session,
            incident_id=state.id,
            installation_id=state.installation_id,
            action=proposed.action,
            from_version=proposed.from_version,
            to_version=to_version,
            automatic=proposed.automatic,
            decision_source=action.source,
            confidence=proposed.confidence,
            requested_by=proposed.requested_by,
        )
        if attempt_id is None:
            return WAIT  # another run started it
        await repo.move_incident(
            session,
            state.id,
            expected=expected,
            status=IncidentStatus.STAGING,
            reason=f"{proposed.action} to {to_version}: allowed by the policy gate",
            next_check_in_s=self.settings.heal_lease_s,
        )
        return CONTINUE

    async def _staging(self, state: IncidentState) -> StepResult:
        attempt = state.attempt
        if attempt is None or attempt.status not in (AttemptStatus.PENDING, AttemptStatus.STAGING):
            return await self._attempt_gone(state)
        if attempt.automatic and attempt.status == AttemptStatus.PENDING:
            cancelled = await self._cancel_if_kill_switch(state, attempt)
            if cancelled is not None:
                return cancelled
        if attempt.staging_passed:
            return await self._apply(state, attempt)
        if _skips_staging(state, attempt.action, attempt.to_version):
            async with self._locked(state) as session:
                await repo.move_attempt(
                    session,
                    attempt.id,
                    expected=attempt.status,
                    status=AttemptStatus.STAGING,
                    staging_report={
                        "status": "passed",
                        "skipped": f"rollback to {attempt.to_version}, this installation's"
                        " known-good version (it ran healthy here for a whole health window)",
                    },
                )
            return CONTINUE
        if not self.staging.configured:
            return await self._fail_attempt(
                state,
                attempt,
                "no staging runner configured (STAGING_RUNNER_URL is unset); nothing was"
                " changed in production",
            )
        if attempt.staging_run_id is None:
            return await self._start_staging(state, attempt)
        return await self._poll_staging(state, attempt)

    async def _start_staging(self, state: IncidentState, attempt: AttemptRow) -> StepResult:
        async with self.maker() as session:
            payload = await releases.command_payload(
                session, state.plugin_name, attempt.to_version or ""
            )
        if payload is None:
            return await self._fail_attempt(
                state, attempt, f"the release {attempt.to_version} disappeared before staging"
            )
        artifact = str(payload["artifact_url"])
        if artifact.startswith("/"):
            # Served by the control plane: the runner gets a pre-signed URL of its own.
            artifact = self.artifacts.url(
                self.settings.api_base_url,
                state.plugin_name,
                attempt.to_version or "",
                ttl_s=self.settings.artifact_url_ttl_s,
            )
        try:
            run = await self.staging.start(
                plugin=state.plugin_name,
                from_version=attempt.from_version,
                to_version=attempt.to_version or "",
                artifact=artifact,
            )
        except StagingUnavailable as error:
            return await self._staging_unreachable(state, attempt, error.reason)
        async with self._locked(state) as session:
            await repo.move_attempt(
                session,
                attempt.id,
                expected=attempt.status,
                status=AttemptStatus.STAGING,
                staging_run_id=run.id,
                staging_tries_add=1,
                staging_report={"status": run.status, "run_id": run.id, "report": run.report},
            )
            await repo.move_incident(
                session,
                state.id,
                expected=IncidentStatus.STAGING,
                reason=f"staging {attempt.to_version}: run {run.id}",
                next_check_in_s=self.settings.heal_poll_s,
            )
        return WAIT

    async def _poll_staging(self, state: IncidentState, attempt: AttemptRow) -> StepResult:
        assert attempt.staging_run_id is not None
        if (state.now - attempt.created_at).total_seconds() > self.settings.staging_timeout_s:
            return await self._fail_attempt(
                state,
                attempt,
                f"staging run {attempt.staging_run_id} did not finish within"
                f" {self.settings.staging_timeout_s} s; nothing was changed in production",
            )
        try:
            run = await self.staging.status(attempt.staging_run_id)
        except RunLost as error:
            async with self._locked(state) as session:
                await repo.move_attempt(
                    session,
                    attempt.id,
                    expected=AttemptStatus.STAGING,
                    clear_run_id=True,
                    staging_report={"status": "lost", "detail": error.reason},
                )
            return await self._staging_unreachable(state, attempt, error.reason, moved=True)
        except StagingUnavailable as error:
            return await self._staging_unreachable(state, attempt, error.reason)
        report = {"status": run.status, "run_id": run.id, "report": run.report}
        if run.status == "running":
            return await self._look_again(state)
        if run.status == "failed":
            return await self._fail_attempt(
                state,
                attempt,
                f"staging failed: {run.summary}; nothing was changed in production",
                staging_report=report,
            )
        async with self._locked(state) as session:
            moved = await repo.move_attempt(
                session, attempt.id, expected=AttemptStatus.STAGING, staging_report=report
            )
        return CONTINUE if moved else WAIT

    async def _staging_unreachable(
        self, state: IncidentState, attempt: AttemptRow, reason: str, *, moved: bool = False
    ) -> StepResult:
        tries = attempt.staging_tries + 1
        if tries >= self.settings.staging_max_tries:
            return await self._fail_attempt(
                state,
                attempt,
                f"staging runner unusable after {tries} tries ({reason}); failing safe,"
                " nothing was changed in production",
            )
        async with self._locked(state) as session:
            await repo.move_attempt(
                session, attempt.id, expected=attempt.status, staging_tries_add=1
            )
            await repo.move_incident(
                session,
                state.id,
                expected=IncidentStatus.STAGING,
                reason=f"staging runner unusable ({reason}); try {tries} of"
                f" {self.settings.staging_max_tries}",
                next_check_in_s=min(60.0, 2.0**tries),
            )
        return WAIT

    async def _apply(self, state: IncidentState, attempt: AttemptRow) -> StepResult:
        """Queue the command, in the transaction whose policy read allows it."""
        assert state.installation_id is not None
        async with self._locked(state) as session:
            action = PendingAction(
                action=Action(attempt.action),
                to_version=attempt.to_version or "",
                from_version=attempt.from_version,
                automatic=attempt.automatic,
                requested_by=attempt.requested_by or "worker",
                source=attempt.decision_source or "manual",
                confidence=None if attempt.confidence is None else float(attempt.confidence),
            )
            gate = await evaluate(session, _proposed(state, action, attempt_id=attempt.id))
            if not gate.allowed:
                return await self._held_before_apply(session, state, attempt, gate)
            payload = await self._command_payload(
                session,
                state.plugin_name,
                attempt.action,
                attempt.to_version or "",
                staged=not _skips_staging(state, attempt.action, attempt.to_version),
            )
            if payload is None:
                why = f"no signed release of {attempt.to_version} to apply"
                if await self._end_attempt(
                    session,
                    state,
                    attempt,
                    AttemptStatus.FAILED,
                    failure_reason=why,
                    incident_status=IncidentStatus.ESCALATED,
                    reason=why,
                ):
                    failed = _failed(attempt, why)
                    await self._notify(session, "patch_failed", state, "escalated", attempt=failed)
                    await self._notify(
                        session, "escalated", state, "escalated", why, attempt=failed
                    )
                return WAIT
            await self._queue_command(
                session,
                state,
                attempt,
                _command_type(attempt),
                payload,
                attempt_status=AttemptStatus.APPLYING,
                executed=True,
                incident_status=IncidentStatus.APPLYING,
                reason=f"{attempt.action} to {attempt.to_version} queued for the plugin",
            )
        return WAIT

    async def _held_before_apply(
        self, session: AsyncSession, state: IncidentState, attempt: AttemptRow, gate: GateResult
    ) -> StepResult:
        """The gate refuses what it allowed before staging (kill switch, approvals now needed
        after a severity rise, a tighter policy, caps). Nothing reached production: the attempt
        ends cancelled and the incident waits with its action, where approvals can reach it and
        the usual re-checks apply; an attempt never squats an in-flight slot while it waits."""
        status = "awaiting_approval" if gate.waits_for_approval_only else "blocked_by_policy"
        await self._end_attempt(
            session,
            state,
            attempt,
            AttemptStatus.CANCELLED,
            failure_reason=f"held by the policy gate before it was applied: {gate.summary}",
            incident_status=status,
            reason=f"attempt cancelled before applying: {gate.summary}",
            next_check_in_s=self.settings.blocked_recheck_s,
        )
        if status == "awaiting_approval":
            await self._notify(session, "approval_needed", state, status, gate.summary)
        return WAIT

    async def _applying(self, state: IncidentState) -> StepResult:
        attempt = state.attempt
        if attempt is None or attempt.status != AttemptStatus.APPLYING:
            return await self._attempt_gone(state)
        command = state.commands.get(_command_type(attempt))
        if command is None:
            return await self._fail_attempt(state, attempt, "the attempt's command is missing")
        if command.status == "acked":
            async with self._locked(state) as session:
                await repo.move_attempt(
                    session,
                    attempt.id,
                    expected=AttemptStatus.APPLYING,
                    status=AttemptStatus.VERIFYING,
                    verify_for_s=self.settings.health_window_s,
                )
                await repo.move_incident(
                    session,
                    state.id,
                    expected=IncidentStatus.APPLYING,
                    status=IncidentStatus.VERIFYING,
                    reason=f"{attempt.to_version} applied; verifying health for"
                    f" {self.settings.health_window_s} s",
                    next_check_in_s=self.settings.heal_poll_s,
                )
            return WAIT
        if command.status == "failed":
            return await self._fail_attempt(
                state, attempt, f"the plugin could not apply {attempt.to_version}: {command.error}"
            )
        if command.status == "cancelled" and attempt.automatic:
            # The kill switch cancelled it before it was handed out (the trigger on
            # ops_policy): nothing was applied; the incident waits for autopatch.
            cancelled = await self._cancel_if_kill_switch(state, attempt)
            if cancelled is not None:
                return cancelled
        if command.held_at is not None and _undeliverable(state, command):
            return await self._hand_back_held(state, attempt, command)
        if command.status in ("expired", "cancelled") or _undeliverable(state, command):
            return await self._fail_attempt(
                state,
                attempt,
                f"the plugin did not acknowledge the {command.type} command after"
                f" {command.delivery_count} deliveries"
                if command.status != "cancelled"
                else f"the {command.type} command was cancelled before it was delivered",
                expire_command_id=command.id,
            )
        return await self._look_again(state)

    async def _verifying(self, state: IncidentState) -> StepResult:
        attempt = state.attempt
        if attempt is None or attempt.status != AttemptStatus.VERIFYING:
            return await self._attempt_gone(state)
        assert state.installation_id is not None and attempt.to_version is not None
        command = state.commands.get(_command_type(attempt))
        since = command.acked_at if command and command.acked_at else attempt.executed_at
        assert since is not None
        needed = self.settings.recovery_heartbeats
        async with self.maker() as session:
            rows = await repo.samples_since(
                session,
                state.installation_id,
                since=since,
                version=attempt.to_version,
                limit=needed + 1,
            )
        samples = [Sample.of(r) for r in rows]
        if state.current_version == attempt.to_version and _healthy(
            state.type, samples, needed, self.settings
        ):
            return await self._succeed(state, attempt)
        if state.current_version == attempt.to_version and _still_sick(
            state.type, samples, needed, self.settings
        ):
            # Proven sick before the window ends: no reason to keep the plugin on it.
            return await self._roll_back(
                state,
                attempt,
                f"{state.type} still present on {attempt.to_version}"
                f" ({needed} heartbeats in a row after the change)",
            )
        deadline = attempt.verify_deadline_at
        if deadline is not None and state.now < deadline:
            wait = min(self.settings.heal_poll_s, (deadline - state.now).total_seconds())
            return await self._look_again(state, max(0.05, wait))
        if not samples:
            why = f"no heartbeat on {attempt.to_version} within {self.settings.health_window_s} s"
        else:
            why = (
                f"{state.type} still present on {attempt.to_version} after"
                f" {self.settings.health_window_s} s ({len(samples)} heartbeats)"
            )
        return await self._roll_back(state, attempt, why)

    async def _roll_back(self, state: IncidentState, attempt: AttemptRow, why: str) -> StepResult:
        """Queue the rollback of a patch that failed verification: back to the installation's
        known-good version (the last one healthy for a whole health window), else to the
        version the patch replaced; never to the version that just failed. The plugin goes
        back to a version it holds, so no signed release of it is needed."""
        assert state.installation_id is not None
        target = state.previous_version
        if target is None or target == attempt.to_version:
            target = attempt.from_version
        if attempt.action == Action.ROLLBACK or target is None or target == attempt.to_version:
            return await self._fail_attempt(
                state,
                attempt,
                f"health check failed ({why}) and there is no earlier version to go back to",
                critical=True,
            )
        async with self._locked(state) as session:
            blocked = attempt.automatic and await repo.kill_switch_engaged(
                session, before_change=False
            )
        if blocked:
            return await self._fail_attempt(
                state,
                attempt,
                f"health check failed ({why}); the automatic rollback is held by the kill"
                " switch: roll back by hand",
                critical=True,
            )
        async with self._locked(state) as session:
            payload = await self._command_payload(session, state.plugin_name, "rollback", target)
            assert payload is not None  # a rollback needs no release
            if attempt.automatic and await repo.kill_switch_engaged(session, before_change=True):
                return WAIT  # flipped meanwhile: the next run fails the attempt as above
            await self._queue_command(
                session,
                state,
                attempt,
                "rollback",
                payload,
                rollback_reason=f"health check: {why}; back to {target}",
                incident_status=IncidentStatus.ROLLING_BACK,
                reason=f"health check failed ({why}); rolling back to {target}",
            )
        return WAIT

    async def _rolling_back(self, state: IncidentState) -> StepResult:
        attempt = state.attempt
        if attempt is None or attempt.status != AttemptStatus.VERIFYING:
            return await self._attempt_gone(state)
        command = state.commands.get("rollback")
        if command is None:
            return await self._fail_attempt(
                state, attempt, "the rollback command is missing", critical=True
            )
        if command.status == "acked":
            return await self._verify_rollback(state, attempt, command)
        if command.status in ("failed", "expired", "cancelled") or _undeliverable(state, command):
            if command.status == "cancelled":
                detail = (
                    "the rollback command was cancelled before delivery (kill switch, or by"
                    " hand); roll back by hand"
                )
            else:
                detail = (
                    command.error or f"not acknowledged after {command.delivery_count} deliveries"
                )
            return await self._fail_attempt(
                state,
                attempt,
                f"rollback to {command.version or attempt.from_version} failed: {detail}",
                critical=True,
                expire_command_id=command.id if command.status != "failed" else None,
            )
        return await self._look_again(state)

    async def _command_payload(
        self,
        session: AsyncSession,
        plugin: str,
        action: str,
        version: str,
        *,
        staged: bool = False,
    ) -> dict[str, Any] | None:
        """The payload of the command that takes the plugin to `version` (docs/contracts.md): an
        update needs a signed, unexpired release (None without one); a rollback is
        `{"version"}`, plus the release's fields when a signed release of it exists. A staged
        rollback (to a version that is not the installation's known-good one) needs the
        signed release as an update does (None without one)."""
        release = await releases.command_payload(
            session, plugin, version, base_url=self.settings.api_base_url
        )
        if action == "rollback" and not (staged and release is None):
            return {"version": version, **(release or {})}
        return release

    async def _verify_rollback(
        self, state: IncidentState, attempt: AttemptRow, command: repo.CommandRow
    ) -> StepResult:
        """The plugin is back on the target version: the rollback counts as done (the attempt
        ends rolled_back) once it is proven healthy there, as a patch is, and the incident
        stays open meanwhile (so the plugin keeps the short heartbeat interval). Still sick
        there, or silent for the whole health window: the rollback did not heal it, and a
        human has to look (escalated, critical)."""
        assert state.installation_id is not None and command.acked_at is not None
        target = command.version or attempt.from_version or ""
        needed = self.settings.recovery_heartbeats
        async with self.maker() as session:
            rows = await repo.samples_since(
                session,
                state.installation_id,
                since=command.acked_at,
                version=target,
                limit=needed + 1,
            )
        samples = [Sample.of(r) for r in rows]
        on_target = state.current_version == target
        healed = on_target and _healthy(state.type, samples, needed, self.settings)
        sick = on_target and _still_sick(state.type, samples, needed, self.settings)
        deadline = command.acked_at + timedelta(seconds=self.settings.health_window_s)
        if not (healed or sick or state.now >= deadline):
            return await self._look_again(
                state, min(self.settings.heal_poll_s, (deadline - state.now).total_seconds())
            )
        if healed:
            status, reason = "rolled_back", f"rolled back to {target}: {attempt.rollback_reason}"
        elif sick:
            status = "escalated"
            reason = f"rolled back to {target}, but {state.type} is still present there"
        else:
            status = "escalated"
            reason = (
                f"rolled back to {target}, but no healthy heartbeats on it within"
                f" {self.settings.health_window_s} s"
            )
        async with self._locked(state) as session:
            if not await self._end_attempt(
                session,
                state,
                attempt,
                AttemptStatus.ROLLED_BACK,
                rolled_back=True,
                incident_status=status,
                reason=reason,
                severity=None if healed else "critical",
            ):
                return WAIT
            await self._record_feedback(session, state, attempt, "rolled_back")
            await self._notify(session, "rolled_back", state, "rolled_back", attempt=attempt)
            if not healed:
                await self._notify(
                    session, "escalated", state, "escalated", reason, severity="critical"
                )
            await self._maybe_quarantine(session, state, attempt)
        return WAIT

    # -- endings --------------------------------------------------------------------------

    async def _succeed(self, state: IncidentState, attempt: AttemptRow) -> StepResult:
        async with self._locked(state) as session:
            if not await self._end_attempt(
                session,
                state,
                attempt,
                AttemptStatus.SUCCESS,
                incident_status=IncidentStatus.RESOLVED,
                reason=f"{attempt.action} to {attempt.to_version} verified healthy",
            ):
                return WAIT
            await self._record_feedback(session, state, attempt, "success")
            await self._notify(session, "patch_succeeded", state, "resolved", attempt=attempt)
            if attempt.action == Action.ROLLBACK:
                # Going back healed it: the version it left is a bad release here.
                await self._maybe_quarantine(session, state, attempt)
        return WAIT

    async def _fail_attempt(
        self,
        state: IncidentState,
        attempt: AttemptRow,
        reason: str,
        *,
        staging_report: dict[str, Any] | None = None,
        critical: bool = False,
        expire_command_id: uuid.UUID | None = None,
    ) -> StepResult:
        """The attempt ends failed and the incident goes to a human (escalated).
        expire_command_id: a command given up on, expired in the same transaction; if the
        plugin acked it meanwhile, nothing changes and the next look sees the ack."""
        async with self._locked(state) as session:
            if expire_command_id is not None:
                # Attempt row before command row: the order of the runbook's cancel statement
                # (attempt, then its trigger on the commands), so the two cannot deadlock.
                await repo.lock_attempt(session, attempt.id)
                status = await repo.lock_command(session, expire_command_id)
                if status == "acked":
                    return CONTINUE
                await repo.expire_command(session, expire_command_id)
            if not await self._end_attempt(
                session,
                state,
                attempt,
                AttemptStatus.FAILED,
                failure_reason=reason,
                staging_report=staging_report,
                incident_status=IncidentStatus.ESCALATED,
                reason=reason,
                severity="critical" if critical else None,
            ):
                return WAIT
            await self._record_feedback(session, state, attempt, "failed")
            failed = _failed(attempt, reason)
            severity = "critical" if critical else None
            await self._notify(
                session, "patch_failed", state, "escalated", attempt=failed, severity=severity
            )
            await self._notify(
                session,
                "escalated",
                state,
                "escalated",
                reason,
                attempt=failed,
                severity=severity,
            )
        log.warning("attempt_failed", incident_id=str(state.id), reason=reason)
        return WAIT

    async def _look_again(self, state: IncidentState, in_s: float | None = None) -> StepResult:
        """Nothing to do yet: look at the incident again in `in_s` (the poll interval when
        None), if it is still where this run found it."""
        async with self._locked(state) as session:
            await repo.move_incident(
                session,
                state.id,
                expected=state.status,
                next_check_in_s=self.settings.heal_poll_s if in_s is None else in_s,
            )
        return WAIT

    async def _end_attempt(
        self,
        session: AsyncSession,
        state: IncidentState,
        attempt: AttemptRow,
        status: AttemptStatus,
        *,
        failure_reason: str | None = None,
        staging_report: dict[str, Any] | None = None,
        rolled_back: bool = False,
        incident_status: str,
        reason: str,
        severity: str | None = None,
        next_check_in_s: float | None = None,
    ) -> bool:
        """In the caller's transaction: the attempt ends in `status` (from the status this run
        read), then its incident moves to `incident_status` (from the status this run read).
        False, and nothing changed, when the attempt had moved meanwhile."""
        if not await repo.move_attempt(
            session,
            attempt.id,
            expected=attempt.status,
            status=status,
            failure_reason=failure_reason,
            staging_report=staging_report,
            rolled_back=rolled_back,
            finished=True,
        ):
            return False
        await repo.move_incident(
            session,
            state.id,
            expected=state.status,
            status=incident_status,
            reason=reason,
            severity=severity,
            next_check_in_s=next_check_in_s,
        )
        return True

    async def _queue_command(
        self,
        session: AsyncSession,
        state: IncidentState,
        attempt: AttemptRow,
        type: str,
        payload: dict[str, Any],
        *,
        attempt_status: AttemptStatus | None = None,
        executed: bool = False,
        rollback_reason: str | None = None,
        incident_status: IncidentStatus,
        reason: str,
    ) -> None:
        """In the caller's transaction: queue the command that carries the attempt to the
        plugin (with the configured lifetime and delivery cap; automatic when the attempt is,
        so the kill switch cancels it), mark the attempt (its new status and when it was
        executed; or the `rollback_reason` of a rollback), and move the incident on to
        `incident_status`, looked at again after the poll interval."""
        assert state.installation_id is not None
        await insert_command(
            session,
            installation_id=state.installation_id,
            attempt_id=attempt.id,
            type=type,
            payload=payload,
            automatic=attempt.automatic,
            ttl_s=self.settings.command_ttl_s,
            max_deliveries=self.settings.command_max_deliveries,
        )
        await repo.move_attempt(
            session,
            attempt.id,
            expected=attempt.status,
            status=attempt_status,
            executed=executed,
            rollback_reason=rollback_reason,
        )
        await repo.move_incident(
            session,
            state.id,
            expected=state.status,
            status=incident_status,
            reason=reason,
            next_check_in_s=self.settings.heal_poll_s,
        )

    async def _escalate(self, state: IncidentState, expected: str, reason: str) -> StepResult:
        async with self._locked(state) as session:
            if await repo.move_incident(
                session, state.id, expected=expected, status=IncidentStatus.ESCALATED, reason=reason
            ):
                await self._notify(session, "escalated", state, "escalated", reason)
        return WAIT

    async def _attempt_gone(self, state: IncidentState) -> StepResult:
        """The incident says an attempt is under way but it is not: cancelled (the runbook's
        SQL, or the kill switch) or ended elsewhere. The incident follows the attempt."""
        attempt = state.attempt
        if attempt is not None and attempt.status == AttemptStatus.CANCELLED:
            status, reason = "cancelled", f"attempt {attempt.id} was cancelled"
        elif attempt is not None and attempt.status == AttemptStatus.SUCCESS:
            status, reason = "resolved", f"attempt {attempt.id} succeeded"
        elif attempt is not None and attempt.status == AttemptStatus.ROLLED_BACK:
            status, reason = "rolled_back", f"attempt {attempt.id} was rolled back"
        else:
            status = "escalated"
            reason = "the incident's attempt ended" + (
                f" as {attempt.status}: {attempt.failure_reason}" if attempt else " or is missing"
            )
        async with self._locked(state) as session:
            moved = await repo.move_incident(
                session, state.id, expected=state.status, status=status, reason=reason
            )
            if moved and attempt is not None and attempt.status == AttemptStatus.FAILED:
                # Failed elsewhere (the runbook's SQL, by hand): an attempt failed all the same.
                await self._notify(session, "patch_failed", state, status, attempt=attempt)
            if moved and status in ("cancelled", "escalated"):
                await self._notify(session, status, state, status, reason)
        return WAIT

    async def _hand_back_held(
        self, state: IncidentState, attempt: AttemptRow, command: repo.CommandRow
    ) -> StepResult:
        """The automatic command the plugin had when the kill switch was engaged (held,
        migration 0018) was not acknowledged within its lease: it is never handed out again, so
        it is expired, and the attempt ends cancelled, as the kill switch's pending commands do
        (migration 0007): the incident waits in blocked_by_policy with its pending action, and
        the gate decides again once autopatch is back on (deciding anew if the plugin went to
        another version meanwhile). A late ack is refused (the command is expired)."""
        async with self._locked(state) as session:
            # Attempt row before command row, as in _fail_attempt.
            await repo.lock_attempt(session, attempt.id)
            if await repo.lock_command(session, command.id) != "delivered":
                return CONTINUE  # acked or failed meanwhile: the next look sees it
            await repo.expire_command(session, command.id)
            if not await self._end_attempt(
                session,
                state,
                attempt,
                AttemptStatus.CANCELLED,
                failure_reason=f"the {command.type} command was delivered before the kill switch"
                " was engaged and not acknowledged within its lease; held, it is not sent again",
                incident_status=IncidentStatus.BLOCKED_BY_POLICY,
                reason=f"attempt cancelled: its {command.type} command, held by the kill switch,"
                " was not acknowledged; the action waits for the policy gate again",
                next_check_in_s=self.settings.blocked_recheck_s,
            ):
                return WAIT
        log.warning("held_command_expired", incident_id=str(state.id), command_id=str(command.id))
        return WAIT

    async def _cancel_if_kill_switch(
        self, state: IncidentState, attempt: AttemptRow
    ) -> StepResult | None:
        """Between two steps: an automatic attempt that has not reached the plugin is
        cancelled while the kill switch is engaged. None when it may go on. (A queued command
        is cancelled by the kill switch itself, in the transaction of the switch.)"""
        async with self._locked(state) as session:
            if not await repo.kill_switch_engaged(session, before_change=False):
                return None
            if not await self._end_attempt(
                session,
                state,
                attempt,
                AttemptStatus.CANCELLED,
                failure_reason="kill switch engaged before the change was applied",
                incident_status=IncidentStatus.BLOCKED_BY_POLICY,
                reason="autopatch is disabled (kill switch): attempt cancelled before applying",
                next_check_in_s=self.settings.blocked_recheck_s,
            ):
                return WAIT
        log.warning("attempt_cancelled_by_kill_switch", incident_id=str(state.id))
        return WAIT

    async def _maybe_quarantine(
        self, session: AsyncSession, state: IncidentState, attempt: AttemptRow
    ) -> None:
        """The bad version of a rollback (the patch's target, or the version a rollback left)
        is quarantined once it has been rolled back from SELFHEAL_QUARANTINE_AFTER_ROLLBACKS
        times across the fleet, on the installations of at least
        SELFHEAL_QUARANTINE_MIN_TENANTS tenants: no automatic choice proposes it again. One
        tenant's installations alone (their telemetry is theirs to send) cannot quarantine it
        for everyone: when they reach the count, it is blocked for that tenant only."""
        bad = attempt.to_version if attempt.action == Action.PATCH else attempt.from_version
        if bad is None:
            return
        need, need_tenants = (
            self.settings.quarantine_after_rollbacks,
            self.settings.quarantine_min_tenants,
        )
        tally = await repo.rollbacks_of_version(
            session, plugin_name=state.plugin_name, version=bad, tenant_id=state.tenant_id
        )
        if tally.total >= need and tally.tenants >= need_tenants:
            if await releases.quarantine(
                session,
                state.plugin_name,
                bad,
                f"rolled back {tally.total} times across the fleet, on the installations of"
                f" {tally.tenants} tenants (thresholds: {need} rollbacks, {need_tenants}"
                " tenants)",
            ):
                log.warning(
                    "release_quarantined",
                    plugin=state.plugin_name,
                    version=bad,
                    rollbacks=tally.total,
                    tenants=tally.tenants,
                )
        elif (
            state.tenant_id is not None
            and tally.tenant >= need
            and await releases.block_for_tenant(
                session,
                state.plugin_name,
                bad,
                state.tenant_id,
                f"rolled back {tally.tenant} times on tenant {state.tenant_id}'s installations"
                f" (threshold {need}); quarantine for every tenant needs rollbacks on"
                f" {need_tenants} tenants' installations",
            )
        ):
            log.warning(
                "release_blocked_for_tenant",
                plugin=state.plugin_name,
                version=bad,
                tenant=state.tenant_id,
                rollbacks=tally.tenant,
            )

    async def _record_feedback(
        self, session: AsyncSession, state: IncidentState, attempt: AttemptRow, outcome: str
    ) -> None:
        await record_outcome(
            session,
            Feedback(
                incident_id=str(state.id),
                attempt_id=str(attempt.id),
                incident_type=state.type,
                plugin=state.plugin_name,
                from_version=attempt.from_version,
                to_version=attempt.to_version,
                decision_source=attempt.decision_source or "manual",
                confidence=None if attempt.confidence is None else float(attempt.confidence),
                outcome=outcome,
                tenant_id=state.tenant_id,
            ),
        )

    async def _notify(
        self,
        session: AsyncSession,
        event: str,
        state: IncidentState,
        status: str,
        detail: str | None = None,
        *,
        attempt: AttemptRow | None = None,
        severity: str | None = None,
    ) -> None:
        incident = state.as_notification() | {"status": status}
        if severity:
            incident["severity"] = severity
        await notify(
            session,
            event,
            incident=incident,
            attempt=_attempt_json(attempt) if attempt else None,
            detail=detail,
        )


def _proposed(
    state: IncidentState, action: PendingAction, *, attempt_id: uuid.UUID | None = None
) -> ProposedAction:
    assert state.installation_id is not None and state.tenant_id is not None
    return proposed_from_pending(
        incident_id=state.id,
        installation_id=state.installation_id,
        tenant_id=state.tenant_id,
        plugin_name=state.plugin_name,
        severity=state.severity,
        pending=action,
        generation=state.attempt_generation,
        attempt_id=attempt_id,
    )


def _skips_staging(state: IncidentState, action: str, to_version: str | None) -> bool:
    """A rollback to the installation's known-good version (the last one it ran healthy for a
    whole health window) goes back to what ran in production here: staging would only delay
    the fix. Anything else, a "rollback" to a version this installation never ran healthy
    included, is a change like a patch: staged, and from a signed release."""
    return (
        action == Action.ROLLBACK
        and to_version is not None
        and to_version == state.known_good_version
    )


def _undeliverable(state: IncidentState, command: repo.CommandRow) -> bool:
    """Expired, or handed out as many times as allowed (or held by the kill switch: never
    handed out again) and the last lease ran out."""
    if command.status not in ("pending", "delivered"):
        return False
    if state.now >= command.expires_at:
        return True
    return (
        (command.delivery_count >= command.max_deliveries or command.held_at is not None)
        and command.lease_expires_at is not None
        and state.now >= command.lease_expires_at
    )


def _command_type(attempt: AttemptRow) -> str:
    """The plugin command that carries the attempt's action."""
    return "update" if attempt.action == Action.PATCH else "rollback"


def _healthy(incident_type: str, samples: list[Sample], needed: int, settings: Settings) -> bool:
    if len(samples) < needed:
        return False
    if incident_type in ("heartbeat_missed",):
        return True  # heartbeats on the new version are the health signal
    return healthy_for(incident_type, samples, thresholds(settings), needed)


def _still_sick(incident_type: str, samples: list[Sample], needed: int, settings: Settings) -> bool:
    """The `needed` newest heartbeats on the new version all still show the problem. The oldest
    heartbeat after the change is left out: the plugin sends it right after applying, and its
    counters are mostly the traffic of before the change."""
    if incident_type == "heartbeat_missed" or len(samples) < needed + 1:
        return False
    t = thresholds(settings)
    return all(not healthy_for(incident_type, [sample], t, 1) for sample in samples[:needed])


def _failed(attempt: AttemptRow, reason: str) -> AttemptRow:
    """The attempt as its failure left it (what patch_failed and escalated report)."""
    return dataclasses.replace(attempt, status=AttemptStatus.FAILED, failure_reason=reason[:2000])


def _attempt_json(attempt: AttemptRow) -> dict[str, Any]:
    return {
        "id": str(attempt.id),
        "action": attempt.action,
        "from_version": attempt.from_version,
        "to_version": attempt.to_version,
        "status": attempt.status,
        "failure_reason": attempt.failure_reason,
        "rollback_reason": attempt.rollback_reason,
    }
