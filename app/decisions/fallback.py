"""Our own decision when the decision service cannot give one (down, slow, circuit open,
nonsense). Pure functions over what the caller read from the database; the rules, first
match wins:

1. silent installation: a heartbeat_missed incident gets no patch or rollback, because
   commands travel in heartbeat responses and a silent installation would never receive
   one; a human has to look.
2. rollback after an update: the incident came within `regression_window` of a version
   change (or detection already called it a regression) and the previous version is known
   and not quarantined -> roll back to it.
3. best observed candidate: among the candidates (not quarantined, not the current
   version) with at least `min_samples` outcomes for this incident type and an observed
   success rate of at least `min_success_rate`, the one with the highest Wilson lower
   bound -> patch. The lower bound, not the raw rate, so that 1 success out of 1 does not
   beat 95 out of 100; it is also the confidence, so thin evidence reads as low confidence.
4. otherwise escalate.

Every explanation says that the decision service was not used and why, and which rule fired.
Confidences stay below what the decision service usually claims: with the default policy
minimum (0.8) only a recent regression or a well-tried version is applied automatically."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from app.core.states import Action
from app.decisions.schemas import Decision, OutcomeStats

Z_95 = 1.96


@dataclass(frozen=True, slots=True)
class FallbackRules:
    regression_window: timedelta = timedelta(hours=1)
    min_samples: int = 3
    min_success_rate: float = 0.5
    # A rollback right after the change is the strongest evidence the fallback ever has;
    # at the end of the window it is weaker, though still better than a coin toss.
    rollback_confidence_fresh: float = 0.9
    rollback_confidence_stale: float = 0.6
    # Detection typed it a regression but we were not told when the version changed.
    rollback_confidence_untimed: float = 0.75


def decide_without_service(
    *,
    reason: str,
    incident_type: str,
    current_version: str | None,
    previous_version: str | None,
    version_changed_at: datetime | None,
    detected_at: datetime,
    candidates: Sequence[str],
    outcomes: Mapping[str, OutcomeStats],
    quarantined: Collection[str] = frozenset(),
    rules: FallbackRules = FallbackRules(),  # frozen: one shared default is safe
) -> Decision:
    preface = f"Decision service unavailable ({reason}); fallback rule"
    if incident_type == "heartbeat_missed":
        return Decision(
            Action.ESCALATE,
            None,
            0.0,
            f"{preface} 'silent installation': commands are delivered in heartbeat "
            "responses, so nothing can be applied to an installation that sends none.",
            "fallback",
            rule="silent_installation",
            fallback_reason=reason,
        )
    rollback = rollback_after_update(
        incident_type=incident_type,
        current_version=current_version,
        previous_version=previous_version,
        version_changed_at=version_changed_at,
        detected_at=detected_at,
        quarantined=quarantined,
        rules=rules,
    )
    if rollback is not None:
        confidence, why = rollback
        return Decision(
            Action.ROLLBACK,
            previous_version,
            confidence,
            f"{preface} 'rollback after update': {why}",
            "fallback",
            rule="rollback_after_update",
            fallback_reason=reason,
        )
    best = best_observed_candidate(
        incident_type=incident_type,
        current_version=current_version,
        candidates=candidates,
        outcomes=outcomes,
        quarantined=quarantined,
        rules=rules,
    )
    if best is not None:
        version, confidence, why = best
        return Decision(
            Action.PATCH,
            version,
            confidence,
            f"{preface} 'best observed candidate': {why}",
            "fallback",
            rule="best_observed_candidate",
            fallback_reason=reason,
        )
    return Decision(
        Action.ESCALATE,
        None,
        0.0,
        f"{preface} 'escalate': no recent version change to undo and no candidate with "
        f"at least {rules.min_samples} observed outcomes for {incident_type} and a success "
        f"rate of {rules.min_success_rate:.0%} or more.",
        "fallback",
        rule="escalate",
        fallback_reason=reason,
    )


def rollback_after_update(
    *,
    incident_type: str,
    current_version: str | None,
    previous_version: str | None,
    version_changed_at: datetime | None,
    detected_at: datetime,
    quarantined: Collection[str],
    rules: FallbackRules,
) -> tuple[float, str] | None:
    """(confidence, explanation) when rolling back to the previous version is indicated."""
    if (
        previous_version is None
        or previous_version == current_version
        or previous_version in quarantined
    ):
        return None
    if version_changed_at is not None:
        since_change = detected_at - version_changed_at
        if timedelta(0) <= since_change <= rules.regression_window:
            share = since_change / rules.regression_window
            confidence = rules.rollback_confidence_fresh - share * (
                rules.rollback_confidence_fresh - rules.rollback_confidence_stale
            )
            return (
                round(confidence, 3),
                f"{incident_type} detected {_duration(since_change)} after the change from "
                f"{previous_version} to {current_version} "
                f"(window {_duration(rules.regression_window)}); "
                f"rolling back to {previous_version}.",
            )
    if incident_type == "regression":
        return (
            rules.rollback_confidence_untimed,
            f"detection reported a regression of {current_version}; rolling back to "
            f"{previous_version}.",
        )
    return None


def best_observed_candidate(
    *,
    incident_type: str,
    current_version: str | None,
    candidates: Sequence[str],
    outcomes: Mapping[str, OutcomeStats],
    quarantined: Collection[str],
    rules: FallbackRules,
) -> tuple[str, float, str] | None:
    """(version, confidence, explanation) of the best-proven candidate, if any qualifies."""
    ranked: list[tuple[float, float, str, OutcomeStats]] = []
    for version in candidates:
        stats = outcomes.get(version)
        if (
            version == current_version
            or version in quarantined
            or stats is None
            or stats.samples < rules.min_samples
            or stats.success_rate < rules.min_success_rate
        ):
            continue
        ranked.append((wilson_lower_bound(stats), stats.samples, version, stats))
    if not ranked:
        return None
    # Ties: more samples, then the order the caller gave (max keeps the first maximum).
    score, _, version, stats = max(ranked, key=lambda item: (item[0], item[1]))
    return (
        version,
        round(score, 3),
        f"{version} healed {stats.successes:g} of {stats.samples:g} {incident_type} incidents "
        f"({stats.success_rate:.0%}; 95% lower bound {score:.2f}, used as confidence).",
    )


def wilson_lower_bound(stats: OutcomeStats, z: float = Z_95) -> float:
    n = stats.samples
    if n == 0:
        return 0.0
    p = stats.success_rate
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
