"""Counters the host increments and heartbeats carry.

Counts are deltas since the last *accepted* heartbeat: a heartbeat reads a snapshot, and only
when the control plane answers with a verified 200 is that snapshot subtracted. Anything
counted meanwhile, and everything counted while the server was away, goes out next time.
Heartbeats of one agent are serialised, so two snapshots never overlap."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_LATENCY_SAMPLES = 10_000
_MAX_LATENCY_MS = 3_600_000.0


@dataclass(frozen=True, slots=True)
class EarlyReport:
    """When counts owed since the last heartbeat look like trouble, the agent reports them at
    once instead of at its next scheduled heartbeat (at most once per `min_spacing_s`): with the
    default 120 s interval a sick plugin would otherwise wait up to two minutes to be noticed.
    The defaults are the control plane's detection thresholds (SELFHEAL_WEBHOOK_MIN_ATTEMPTS,
    SELFHEAL_WEBHOOK_FAIL_RATE_THRESHOLD, SELFHEAL_ERROR_RATE_THRESHOLD)."""

    webhook_min_attempts: int = 10
    webhook_fail_rate: float = 0.5
    error_min_requests: int = 20
    error_rate: float = 0.05
    min_spacing_s: float = 5.0

    def alarming(self, requests: int, errors: int, attempts: int, failures: int) -> bool:
        if attempts >= self.webhook_min_attempts and failures > self.webhook_fail_rate * attempts:
            return True
        return requests >= self.error_min_requests and errors > self.error_rate * requests


@dataclass(frozen=True, slots=True)
class Snapshot:
    requests: int
    errors: int
    webhook_attempts: int
    webhook_failures: int
    latency_samples: int
    latency_p95_ms: float | None

    def telemetry(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "requests": self.requests,
            "errors": self.errors,
            "webhook_attempts": self.webhook_attempts,
            "webhook_failures": self.webhook_failures,
        }
        if self.latency_p95_ms is not None:
            body["latency_p95_ms"] = self.latency_p95_ms
        return body


class Counters:
    """Thread-safe: a host counts from any number of threads (and the ASGI middleware from the
    event loop) while the agent reads from its own."""

    def __init__(
        self,
        early: EarlyReport | None = None,
        on_alarm: Callable[[], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._webhook_attempts = 0
        self._webhook_failures = 0
        self._latencies: list[float] = []
        self._latencies_seen = 0
        self._random = random.Random()
        self._early = early
        self._on_alarm = on_alarm
        self._alarm_raised = False  # once per heartbeat: delivered() re-arms it

    def add_requests(self, count: int) -> None:
        if count < 0:
            raise ValueError("count cannot be negative")
        with self._lock:
            self._requests += count
            alarm = self._newly_alarming()
        if alarm:
            self._raise_alarm()

    def add_errors(self, count: int) -> None:
        if count < 0:
            raise ValueError("count cannot be negative")
        with self._lock:
            self._errors += count
            alarm = self._newly_alarming()
        if alarm:
            self._raise_alarm()

    def add_webhooks(self, *, ok: bool, count: int) -> None:
        if count < 0:
            raise ValueError("count cannot be negative")
        with self._lock:
            self._webhook_attempts += count
            if not ok:
                self._webhook_failures += count
            alarm = self._newly_alarming()
        if alarm:
            self._raise_alarm()

    def _newly_alarming(self) -> bool:
        """Under the lock: the owed counts just crossed the early-report thresholds."""
        if self._early is None or self._alarm_raised:
            return False
        if self._early.alarming(
            self._requests, self._errors, self._webhook_attempts, self._webhook_failures
        ):
            self._alarm_raised = True
            return True
        return False

    def _raise_alarm(self) -> None:
        if self._on_alarm is not None:
            self._on_alarm()

    def add_latency(self, ms: float) -> None:
        if not math.isfinite(ms) or ms < 0:
            return
        ms = min(float(ms), _MAX_LATENCY_MS)
        with self._lock:
            self._latencies_seen += 1
            if len(self._latencies) < MAX_LATENCY_SAMPLES:
                self._latencies.append(ms)
            else:
                # Reservoir sampling keeps the p95 honest when the server is away for long.
                slot = self._random.randrange(self._latencies_seen)
                if slot < MAX_LATENCY_SAMPLES:
                    self._latencies[slot] = ms

    def snapshot(self) -> Snapshot:
        with self._lock:
            samples = list(self._latencies)
            return Snapshot(
                requests=self._requests,
                errors=self._errors,
                webhook_attempts=self._webhook_attempts,
                webhook_failures=self._webhook_failures,
                latency_samples=len(samples),
                latency_p95_ms=p95(samples),
            )

    def delivered(self, snapshot: Snapshot) -> None:
        """The control plane accepted `snapshot`: what it carried is no longer owed. What was
        counted while that heartbeat was on its way may already look like trouble: it rings
        the alarm now rather than at the next count."""
        with self._lock:
            self._requests -= snapshot.requests
            self._errors -= snapshot.errors
            self._webhook_attempts -= snapshot.webhook_attempts
            self._webhook_failures -= snapshot.webhook_failures
            del self._latencies[: snapshot.latency_samples]
            self._latencies_seen = len(self._latencies)
            self._alarm_raised = False
            alarm = self._newly_alarming()
        if alarm:
            self._raise_alarm()


def p95(samples: list[float]) -> float | None:
    """Nearest-rank 95th percentile, rounded to a microsecond."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return round(ordered[rank - 1], 3)
