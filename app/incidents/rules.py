"""Threshold rules over an installation's recent heartbeat samples. Pure functions: the
detector fetches the samples, these decide. Samples come newest first; counters are deltas
since the previous heartbeat, so each sample is one interval of traffic."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from app.core.models import SEVERITIES
from app.core.settings import Settings


@dataclass(frozen=True, slots=True)
class Sample:
    received_at: datetime
    requests: int
    errors: int
    webhook_attempts: int
    webhook_failures: int
    uptime_s: int | None
    plugin_version: str | None = None
    sent_at: datetime | None = None  # the plugin's own clock, when it said

    @classmethod
    def of(cls, row: Any) -> Sample:
        """From a result row with the heartbeat columns of the same names."""
        return cls(
            row.received_at,
            row.requests,
            row.errors,
            row.webhook_attempts,
            row.webhook_failures,
            row.uptime_s,
            getattr(row, "sample_version", None),
            getattr(row, "sent_at", None),
        )

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def webhook_fail_rate(self) -> float:
        return self.webhook_failures / self.webhook_attempts if self.webhook_attempts else 0.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    consecutive: int = 1  # N: the rule must hold on the N newest samples
    webhook_fail_rate: float = 0.5
    webhook_min_attempts: int = 10
    error_rate: float = 0.05
    error_min_requests: int = 20  # fewer requests in a heartbeat say nothing about errors
    error_spike_factor: float = 3.0  # and k times the installation's own baseline
    baseline_samples: int = 10  # the samples before the N newest
    crash_loop_resets: int = 3  # uptime went down this often...
    crash_loop_samples: int = 10  # ...within this many newest samples
    regression_window: timedelta = timedelta(hours=1)


def thresholds(settings: Settings) -> Thresholds:
    """The rules' thresholds as configured: one for detection, the heartbeat answer's
    urgency and the healing loop's verification alike."""
    return _thresholds(
        settings.detect_consecutive_samples,
        settings.webhook_fail_rate_threshold,
        settings.webhook_min_attempts,
        settings.error_rate_threshold,
        settings.error_min_requests,
        settings.error_spike_factor,
        settings.crash_loop_restarts,
        settings.regression_window_s,
    )


@functools.cache
def _thresholds(
    consecutive: int,
    webhook_fail_rate: float,
    webhook_min_attempts: int,
    error_rate: float,
    error_min_requests: int,
    error_spike_factor: float,
    crash_loop_resets: int,
    regression_window_s: float,
) -> Thresholds:
    """Built once per configuration: the heartbeat path asks for it at every request."""
    return Thresholds(
        consecutive=consecutive,
        webhook_fail_rate=webhook_fail_rate,
        webhook_min_attempts=webhook_min_attempts,
        error_rate=error_rate,
        error_min_requests=error_min_requests,
        error_spike_factor=error_spike_factor,
        crash_loop_resets=crash_loop_resets,
        regression_window=timedelta(seconds=regression_window_s),
    )


@dataclass(frozen=True, slots=True)
class Finding:
    type: str
    severity: str
    first_bad_signal_at: datetime
    evidence: dict[str, Any] = field(default_factory=dict)


def webhook_failing(samples: list[Sample], t: Thresholds) -> Finding | None:
    window = samples[: t.consecutive]
    if len(window) < t.consecutive or not all(
        s.webhook_attempts >= t.webhook_min_attempts and s.webhook_fail_rate > t.webhook_fail_rate
        for s in window
    ):
        return None
    rate = sum(s.webhook_failures for s in window) / sum(s.webhook_attempts for s in window)
    # The brief's example, 0.6, is a medium incident.
    severity = "high" if rate >= 0.9 else "medium" if rate >= 0.5 else "low"
    return Finding(
        "webhook_fail_rate",
        severity,
        window[-1].received_at,
        {"webhook_fail_rate": round(rate, 4), "samples": len(window)},
    )


def error_spiking(samples: list[Sample], t: Thresholds) -> Finding | None:
    window = samples[: t.consecutive]
    if len(window) < t.consecutive:
        return None
    history = samples[t.consecutive : t.consecutive + t.baseline_samples]
    requests = sum(s.requests for s in history)
    baseline = sum(s.errors for s in history) / requests if requests else 0.0
    if not all(
        s.requests >= max(1, t.error_min_requests)
        and s.error_ratio > t.error_rate
        and s.error_ratio > t.error_spike_factor * baseline
        for s in window
    ):
        return None
    ratio = sum(s.errors for s in window) / sum(s.requests for s in window)
    severity = "high" if ratio >= 0.5 else "medium" if ratio >= 0.2 else "low"
    return Finding(
        "error_spike",
        severity,
        window[-1].received_at,
        {"error_ratio": round(ratio, 4), "baseline": round(baseline, 4), "samples": len(window)},
    )


# uptime_s is whole seconds (truncated), so a plugin that ran on has
# uptime(newer) >= uptime(older) + elapsed - 1; one more second for clock resolution.
RESTART_SLACK_S = 2.0


def restarted(newer: Sample, older: Sample) -> bool:
    """Whether the plugin started again between two of its heartbeats: its uptime went down,
    or (with both `sent_at`) it is shorter than the time between them. The second catches
    what the first misses: the heartbeats a crash-looping plugin sends as it starts all say
    an uptime of about 0 s, and the later of two may say more than the earlier one."""
    if newer.uptime_s is None or older.uptime_s is None:
        return False
    if newer.uptime_s < older.uptime_s:
        return True
    if newer.sent_at is None or older.sent_at is None:
        return False
    between = (newer.sent_at - older.sent_at).total_seconds()
    return newer.uptime_s < between - RESTART_SLACK_S


def crash_looping(samples: list[Sample], t: Thresholds) -> Finding | None:
    # Restarts on the version running now only: an update restarts the plugin, and the
    # restarts of a crash loop a patch just healed are not this version's.
    window = samples[: t.crash_loop_samples]
    if window and window[0].plugin_version is not None:
        current = window[0].plugin_version
        window = list(itertools.takewhile(lambda s: s.plugin_version == current, window))
    resets = [newer for newer, older in itertools.pairwise(window) if restarted(newer, older)]
    if len(resets) < t.crash_loop_resets:
        return None
    return Finding("crash_loop", "high", resets[-1].received_at, {"restarts": len(resets)})


def as_regression(
    finding: Finding,
    *,
    previous_version: str | None,
    version_changed_at: datetime | None,
    t: Thresholds,
) -> Finding:
    """A problem that starts soon after a version change points at that version: the
    incident says so (type regression, one severity level up) and names the version to go
    back to."""
    if (
        previous_version is None
        or version_changed_at is None
        or finding.first_bad_signal_at - version_changed_at > t.regression_window
        or finding.first_bad_signal_at < version_changed_at
    ):
        return finding
    level = min(SEVERITIES.index(finding.severity) + 1, len(SEVERITIES) - 1)
    return Finding(
        "regression",
        SEVERITIES[level],
        finding.first_bad_signal_at,
        {
            **finding.evidence,
            "signal": finding.type,
            "previous_version": previous_version,
            "version_changed_at": version_changed_at.isoformat(),
        },
    )


def looks_unhealthy(
    t: Thresholds, *, requests: int, errors: int, webhook_attempts: int, webhook_failures: int
) -> bool:
    """One heartbeat's counters cross an absolute threshold (no baseline, no history): the
    API asks such a plugin to come back soon, before detection has even looked at it."""
    if webhook_attempts >= t.webhook_min_attempts and (
        webhook_failures > t.webhook_fail_rate * webhook_attempts
    ):
        return True
    return requests >= max(1, t.error_min_requests) and errors > t.error_rate * requests


RULES = (webhook_failing, error_spiking, crash_looping)


def findings_for(
    samples: list[Sample],
    t: Thresholds,
    *,
    previous_version: str | None = None,
    version_changed_at: datetime | None = None,
) -> list[Finding]:
    found = []
    for rule in RULES:
        finding = rule(samples, t)
        if finding is not None:
            found.append(
                as_regression(
                    finding,
                    previous_version=previous_version,
                    version_changed_at=version_changed_at,
                    t=t,
                )
            )
    # One regression incident per installation, however many signals point at the version.
    regressions = [f for f in found if f.type == "regression"]
    return [f for f in found if f.type != "regression"] + regressions[:1]


def healthy_for(incident_type: str, samples: list[Sample], t: Thresholds, count: int) -> bool:
    """The `count` newest samples all show the problem gone."""
    window = samples[:count]
    if len(window) < count:
        return False
    single = Thresholds(
        consecutive=1,
        webhook_fail_rate=t.webhook_fail_rate,
        webhook_min_attempts=t.webhook_min_attempts,
        error_rate=t.error_rate,
        error_min_requests=1,  # recovered means errors under the rate, whatever the traffic
        error_spike_factor=0.0,  # recovered means under the absolute threshold
        baseline_samples=0,
        crash_loop_resets=1,
        crash_loop_samples=2,
    )
    checks = {
        "webhook_fail_rate": lambda i: webhook_failing(window[i:], single) is None,
        "error_spike": lambda i: error_spiking(window[i:], single) is None,
        "crash_loop": lambda i: crash_looping(window[i:], single) is None,
    }
    if incident_type == "regression":
        return all(checks[name](i) for name in checks for i in range(len(window)))
    check = checks.get(incident_type)
    return check is not None and all(check(i) for i in range(len(window)))
