"""A circuit breaker in front of the decision service.

closed: calls go through; `failure_threshold` consecutive failures open it.
open: calls are refused at once (the caller falls back) until `cool_down_s` has passed.
half_open: exactly one call, the probe, goes through; its success closes the circuit, its
failure opens it for another cool-down. Other calls are refused while the probe is out.

The breaker lives in one process (one per worker process), not in Redis: a shared breaker
would put a Redis round trip in front of every decision and become a failure mode of its
own, while every process sees the same outage and opens its own breaker after
`failure_threshold` failures anyway. The cost is that N processes spend N times the
threshold on a dead service, and each sends its own probe.

Methods never await, so within one event loop no lock is needed; do not share an instance
between threads."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]
Admission = Literal["call", "probe", "reject"]


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cool_down_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cool_down_s <= 0:
            raise ValueError("cool_down_s must be positive")
        self.failure_threshold = failure_threshold
        self.cool_down_s = cool_down_s
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started_at: float | None = None
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        """The state a call made now would meet: an open circuit whose cool-down is over
        reads as half_open, since the next call will be the probe."""
        if self._state == "open" and self._cool_down_over():
            return "half_open"
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in_s(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.cool_down_s - self._clock())

    def admit(self) -> Admission:
        """Ask before each call. "probe" means this call decides the circuit's fate: make
        exactly one request and report its result."""
        if self._state == "closed":
            return "call"
        if self._state == "open":
            if not self._cool_down_over():
                return "reject"
            self._move("half_open")
        # A probe whose caller vanished without reporting (its task was cancelled) must not
        # keep the circuit half-open for ever: after one cool-down another probe may go.
        probe_lost = (
            self._probe_started_at is not None
            and self._clock() - self._probe_started_at >= self.cool_down_s
        )
        if self._probe_started_at is not None and not probe_lost:
            return "reject"
        self._probe_started_at = self._clock()
        return "probe"

    def record_success(self) -> None:
        self._failures = 0
        self._probe_started_at = None
        if self._state != "closed":
            self._move("closed")

    def record_failure(self) -> None:
        self._failures += 1
        if self._state == "half_open" or (
            self._state == "closed" and self._failures >= self.failure_threshold
        ):
            self._open()

    def snapshot(self) -> dict[str, object]:
        """For /health and metrics."""
        return {
            "state": self.state,
            "consecutive_failures": self._failures,
            "times_opened": self.times_opened,
            "retry_in_s": round(self.retry_in_s(), 3),
        }

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probe_started_at = None
        self.times_opened += 1
        self._move("open")

    def _cool_down_over(self) -> bool:
        return self._clock() - self._opened_at >= self.cool_down_s

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old != new and self._on_change is not None:
            self._on_change(old, new)
