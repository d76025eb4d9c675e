"""What goes to the decision service, what may come back, and the decision we record.

The decision service is outside our control, so its answer is checked as strictly as a
plugin's request: an answer that does not fit is not "probably fine", it is a failure and
the fallback decides instead."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.states import Action

# What the decision service may answer (the contract): the actions of app/core/states.py a
# decision can name (RESOLVE is for operators only).
WireAction = Literal["patch", "rollback", "ignore", "escalate"]
assert set(WireAction.__args__) == set(Action) - {Action.RESOLVE}  # type: ignore[attr-defined]
Source = Literal["sira", "fallback"]
ACTIONS_WITH_VERSION = frozenset({"patch", "rollback"})
MAX_EXPLANATION_CHARS = 2000


@dataclass(frozen=True, slots=True)
class IncidentFacts:
    """The incident as the decision service contract describes it (docs/contracts.md)."""

    id: str
    type: str
    severity: str
    plugin: str
    current_version: str | None
    previous_version: str | None
    detected_at: datetime
    tenant_id: str | None = None
    telemetry_snapshot: Mapping[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "severity": self.severity,
            "tenant_id": self.tenant_id,
            "plugin": self.plugin,
            "current_version": self.current_version,
            "previous_version": self.previous_version,
            "telemetry_snapshot": dict(self.telemetry_snapshot),
            "detected_at": self.detected_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class OutcomeStats:
    """How attempts that moved installations to one version ended, for one incident type.
    Weighed by tenant (app/healing/repository.py, `outcome_stats`), so not always whole."""

    successes: float = 0
    failures: float = 0  # failed or rolled back

    @property
    def samples(self) -> float:
        return self.successes + self.failures

    @property
    def success_rate(self) -> float:
        return self.successes / self.samples if self.samples else 0.0


@dataclass(frozen=True, slots=True)
class LocalEvidence:
    """What our own records know that the contract does not send; only the fallback uses it
    (plus `quarantined`, which also vetoes the service's choice)."""

    version_changed_at: datetime | None = None
    outcomes: Mapping[str, OutcomeStats] = field(default_factory=dict)  # by version
    quarantined: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    patch_version: str | None
    confidence: float
    explanation: str
    source: Source
    rule: str | None = None  # the fallback rule that fired
    fallback_reason: str | None = None  # why the decision service was not used

    def as_record(self) -> dict[str, Any]:
        """The JSON stored with the incident (plugin_incidents.sira_decision)."""
        return {
            "action": self.action,
            "patch_version": self.patch_version,
            "confidence": self.confidence,
            "explanation": self.explanation,
            "source": self.source,
            "rule": self.rule,
            "fallback_reason": self.fallback_reason,
        }


@dataclass(frozen=True, slots=True)
class Feedback:
    """One attempt outcome, as stored in sira_learning_feedback and sent to /feedback."""

    incident_id: str
    attempt_id: str
    incident_type: str
    plugin: str
    from_version: str | None
    to_version: str | None
    decision_source: str  # sira, fallback, or manual (an operator asked)
    confidence: float | None
    outcome: str
    # The tenant of the installation the outcome was seen on, so that the decision service can
    # weigh tenants (one tenant's installations are not the fleet). None: not known.
    tenant_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "incident_id": self.incident_id,
            "attempt_id": self.attempt_id,
            "incident_type": self.incident_type,
            "plugin": self.plugin,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "decision_source": self.decision_source,
            "confidence": self.confidence,
            "outcome": self.outcome,
            "tenant_id": self.tenant_id,
        }


class SiraAnswer(BaseModel):
    """The response body of POST /api/sira/decide. Strict: no "0.9" for 0.9, no true for 1.
    Unknown keys are ignored so that the service can add fields without breaking us."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    action: WireAction
    patch_version: str | None = Field(default=None, max_length=128)
    confidence: float = Field(ge=0, le=1, allow_inf_nan=False)
    explanation: str = Field(max_length=MAX_EXPLANATION_CHARS)


class NonsenseAnswer(ValueError):
    """The decision service answered, but not with something we may act on."""


def parse_answer(
    body: bytes,
    *,
    candidates: Sequence[str],
    previous_version: str | None,
    quarantined: Collection[str] = frozenset(),
) -> SiraAnswer:
    """Validate a response body against the contract and against the question asked.

    A patch must go to one of the candidates we offered; a rollback to the previous version
    or to one of the candidates (an older known-good release). Anything else would make us
    install a version nobody vetted, so it is nonsense, as is a quarantined version. For
    ignore and escalate a version is meaningless and dropped."""
    try:
        answer = SiraAnswer.model_validate_json(body)
    except ValidationError as error:
        raise NonsenseAnswer(_summarize(error)) from None
    if answer.action not in ACTIONS_WITH_VERSION:
        return answer.model_copy(update={"patch_version": None})
    version = answer.patch_version
    if version is None:
        raise NonsenseAnswer(f"action {answer.action} without patch_version")
    allowed = set(candidates)
    if answer.action == "rollback" and previous_version is not None:
        allowed.add(previous_version)
    if version not in allowed:
        raise NonsenseAnswer(
            f"{answer.action} to {version!r}, which is not among the versions offered "
            f"({', '.join(sorted(allowed)) or 'none'})"
        )
    if version in quarantined:
        raise NonsenseAnswer(f"{answer.action} to quarantined version {version!r}")
    return answer


def _summarize(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
