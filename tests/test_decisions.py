"""Decision client, circuit breaker and fallback heuristics, without the network: the
decision service is stubbed at httpx's transport (end-to-end runs are in test_sim.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from app.decisions import (
    CircuitBreaker,
    DecisionClient,
    FallbackRules,
    Feedback,
    FeedbackNotDelivered,
    LocalEvidence,
    OutcomeStats,
    decide_without_service,
)
from app.decisions.fallback import wilson_lower_bound
from tests.support.decisions import DETECTED, incident
from tests.support.scripted import ScriptedPeer

SIRA = "http://sira.test"
TOKEN = "sira-token"
CANDIDATES = ["1.2.3", "1.2.4"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def answer(**overrides: Any) -> dict[str, Any]:
    body = {
        "action": "patch",
        "patch_version": "1.2.3",
        "confidence": 0.87,
        "explanation": "1.2.3 fixes webhook retries",
    }
    body.update(overrides)
    return body


Service = ScriptedPeer  # a scripted decision service


def ok(body: Any = None) -> httpx.Response:
    return httpx.Response(200, json=answer() if body is None else body)


def status(code: int) -> httpx.Response:
    return httpx.Response(code, json={"detail": "nope"})


async def hang(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(30)
    return ok()


@contextlib.asynccontextmanager
async def decision_client(service: Service, **options: Any) -> AsyncIterator[DecisionClient]:
    options.setdefault("base_url", SIRA)
    options.setdefault("token", TOKEN)
    options.setdefault("backoff_base_s", 0.01)
    options.setdefault("backoff_max_s", 0.02)
    async with httpx.AsyncClient(transport=httpx.MockTransport(service)) as http:
        yield DecisionClient(http, **options)


# --- circuit breaker -------------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cool_down_s=30, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the run: failures must be consecutive
    breaker.record_failure()
    breaker.record_failure()
    assert (breaker.state, breaker.admit()) == ("closed", "call")
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.admit() == "reject"
    assert breaker.snapshot() == {
        "state": "open",
        "consecutive_failures": 3,
        "times_opened": 1,
        "retry_in_s": 30.0,
    }


def test_open_breaker_rejects_for_the_cool_down_then_lets_one_probe_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down_s=30, clock=clock)
    breaker.record_failure()
    clock.advance(29.9)
    assert (breaker.state, breaker.admit()) == ("open", "reject")
    clock.advance(0.1)
    assert breaker.state == "half_open"
    assert breaker.admit() == "probe"
    assert breaker.admit() == "reject"  # only one probe at a time
    assert breaker.admit() == "reject"
    assert breaker.state == "half_open"


def test_successful_probe_closes_the_breaker() -> None:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        failure_threshold=2,
        cool_down_s=5,
        clock=clock,
        on_change=lambda old, new: changes.append((old, new)),
    )
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(5)
    assert breaker.admit() == "probe"
    breaker.record_success()
    assert (breaker.state, breaker.consecutive_failures) == ("closed", 0)
    assert breaker.admit() == "call"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_probe_reopens_the_breaker_for_a_full_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cool_down_s=5, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.advance(7)
    assert breaker.admit() == "probe"
    breaker.record_failure()
    assert breaker.state == "open"
    assert breaker.times_opened == 2
    clock.advance(4.9)
    assert breaker.admit() == "reject"
    clock.advance(0.1)
    assert breaker.admit() == "probe"


def test_a_lost_probe_is_replaced_after_one_cool_down() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down_s=5, clock=clock)
    breaker.record_failure()
    clock.advance(5)
    assert breaker.admit() == "probe"  # and its caller never reports back
    clock.advance(4.9)
    assert breaker.admit() == "reject"
    clock.advance(0.1)
    assert breaker.admit() == "probe"


def test_breaker_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="cool_down_s"):
        CircuitBreaker(cool_down_s=0)


# --- client: answers ---------------------------------------------------------------------


async def test_valid_answer_becomes_the_decision() -> None:
    service = Service(ok())
    async with decision_client(service) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert decision.as_record() == {
        "action": "patch",
        "patch_version": "1.2.3",
        "confidence": 0.87,
        "explanation": "1.2.3 fixes webhook retries",
        "source": "sira",
        "rule": None,
        "fallback_reason": None,
    }
    [request] = service.requests
    assert str(request.url) == f"{SIRA}/api/sira/decide"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(request.content) == {
        "incident": {
            "id": "inc-1",
            "type": "webhook_fail_rate",
            "severity": "medium",
            "tenant_id": "merchant-1",
            "plugin": "payments",
            "current_version": "1.2.2",
            "previous_version": "1.2.1",
            "telemetry_snapshot": {"webhook_attempts": 50, "webhook_failures": 30},
            "detected_at": "2026-11-23T12:00:00+00:00",
        },
        "candidates": ["1.2.3", "1.2.4"],
    }


async def test_rollback_to_the_previous_version_is_accepted() -> None:
    body = answer(action="rollback", patch_version="1.2.1", confidence=1)
    async with decision_client(Service(ok(body))) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert (decision.action, decision.patch_version, decision.confidence) == (
        "rollback",
        "1.2.1",
        1.0,
    )
    assert decision.source == "sira"


async def test_escalate_drops_a_meaningless_version_and_unknown_keys_are_ignored() -> None:
    body = answer(action="escalate", patch_version="9.9.9", model="sira-7")
    async with decision_client(Service(ok(body))) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert (decision.action, decision.patch_version, decision.source) == (
        "escalate",
        None,
        "sira",
    )


async def test_5xx_is_retried_and_the_later_answer_used() -> None:
    service = Service(status(503), status(500), ok())
    async with decision_client(service) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert (decision.source, decision.patch_version) == ("sira", "1.2.3")
    assert service.calls == 3
    assert client.breaker.consecutive_failures == 0


async def test_connect_errors_are_retried() -> None:
    service = Service(httpx.ConnectError("connection refused"), ok())
    async with decision_client(service) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert decision.source == "sira"
    assert service.calls == 2


async def test_persistent_5xx_falls_back_after_max_attempts() -> None:
    service = Service(status(502))
    async with decision_client(service, max_attempts=3) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert service.calls == 3
    assert decision.source == "fallback"
    assert decision.fallback_reason == "HTTP 502 from the decision service (3 attempts)"
    assert client.breaker.consecutive_failures == 1  # one failed decision, one strike


async def test_slow_service_is_cut_off_at_the_deadline() -> None:
    service = Service(hang)
    async with decision_client(service, deadline_s=0.3) as client:
        started = time.monotonic()
        decision = await client.decide(incident(), CANDIDATES)
        elapsed = time.monotonic() - started
    assert elapsed < 0.3 + 0.1
    assert service.calls == 1
    assert decision.source == "fallback"
    assert decision.fallback_reason == "no answer within the 0.3 s deadline (1 attempt)"
    assert "no answer within the 0.3 s deadline" in decision.explanation


class LongestPause(random.Random):
    """Jitter that always picks the longest pause, so that timings are predictable."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_deadline_covers_retries_and_backoff() -> None:
    async def slow_failure(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.1)
        return status(500)

    service = Service(slow_failure)
    # 0.1 s call, 0.1 s pause, 0.1 s call, 0.1 s pause, third call cut off at 0.5 s.
    async with decision_client(
        service,
        deadline_s=0.5,
        max_attempts=10,
        backoff_base_s=0.1,
        backoff_max_s=0.1,
        rng=LongestPause(),
    ) as client:
        started = time.monotonic()
        decision = await client.decide(incident(), CANDIDATES)
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 0.1
    assert service.calls == 3
    assert decision.fallback_reason == "no answer within the 0.5 s deadline (3 attempts)"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>oops</html>", "nonsense answer: body: Invalid JSON"),
        (b"[1, 2]", "nonsense answer: body: Input should be an object"),
        (answer(action="reboot"), "nonsense answer: action: Input should be 'patch'"),
        (answer(confidence=1.5), "nonsense answer: confidence: Input should be less than"),
        (answer(confidence="0.9"), "nonsense answer: confidence: Input should be a valid number"),
        (answer(confidence=True), "nonsense answer: confidence: Input should be a valid number"),
        (answer(explanation=None), "nonsense answer: explanation: Input should be a valid"),
        (answer(explanation="x" * 2001), "nonsense answer: explanation: String should have"),
        (answer(patch_version=None), "nonsense answer: action patch without patch_version"),
        (answer(patch_version="6.6.6"), "nonsense answer: patch to '6.6.6', which is not"),
        (
            answer(action="rollback", patch_version="0.9.0"),
            "nonsense answer: rollback to '0.9.0', which is not among the versions offered "
            "(1.2.1, 1.2.3, 1.2.4)",
        ),
        (
            answer(action="patch", patch_version="1.2.1"),
            "nonsense answer: patch to '1.2.1', which is not among the versions offered "
            "(1.2.3, 1.2.4)",
        ),
    ],
)
async def test_nonsense_falls_back_without_retry(body: Any, reason: str) -> None:
    response = (
        httpx.Response(200, content=body)
        if isinstance(body, bytes)
        else httpx.Response(200, json=body)
    )
    service = Service(response)
    async with decision_client(service) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert service.calls == 1
    assert decision.source == "fallback"
    assert decision.fallback_reason is not None
    assert decision.fallback_reason.startswith(reason), decision.fallback_reason
    assert decision.explanation.startswith(f"Decision service unavailable ({reason}")
    assert client.breaker.consecutive_failures == 1


async def test_a_quarantined_version_from_the_service_is_refused() -> None:
    service = Service(ok())
    evidence = LocalEvidence(quarantined=frozenset({"1.2.3"}))
    async with decision_client(service) as client:
        decision = await client.decide(incident(), CANDIDATES, evidence)
    assert decision.source == "fallback"
    assert decision.fallback_reason == "nonsense answer: patch to quarantined version '1.2.3'"


async def test_an_endless_answer_is_not_read_to_the_end() -> None:
    padding = "x" * 2000
    body = json.dumps({**answer(), "padding": [padding] * 100}).encode()
    async with decision_client(Service(httpx.Response(200, content=body))) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert decision.fallback_reason == "nonsense answer: body larger than 65536 bytes"


async def test_401_is_not_retried() -> None:
    service = Service(status(401), ok())
    async with decision_client(service) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert service.calls == 1
    assert decision.source == "fallback"
    assert decision.fallback_reason == "HTTP 401 from the decision service (credentials refused)"


async def test_unconfigured_service_falls_back_without_a_call() -> None:
    service = Service(ok())
    async with decision_client(service, base_url=None) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert service.calls == 0
    assert decision.fallback_reason == "decision service not configured (SIRA_API_URL unset)"
    assert client.breaker.state == "closed"


async def test_our_own_error_falls_back_without_blaming_the_service() -> None:
    service = Service(ok())
    async with decision_client(service) as client:
        decision = await client.decide(incident(telemetry_snapshot={"x": object()}), CANDIDATES)
    assert service.calls == 0
    assert decision.source == "fallback"
    assert decision.fallback_reason is not None
    assert decision.fallback_reason.startswith("internal error: TypeError")
    assert client.breaker.consecutive_failures == 0


# --- client and breaker together -----------------------------------------------------------


async def test_breaker_opens_after_n_failed_decisions_and_then_calls_nothing() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cool_down_s=30, clock=clock)
    service = Service(status(500))
    async with decision_client(service, breaker=breaker, max_attempts=2) as client:
        for _ in range(3):
            assert (await client.decide(incident(), CANDIDATES)).source == "fallback"
        assert service.calls == 6
        assert breaker.state == "open"
        for _ in range(5):
            decision = await client.decide(incident(), CANDIDATES)
            assert decision.source == "fallback"
        assert service.calls == 6
    assert decision.fallback_reason == (
        "circuit breaker open after 3 consecutive failures; next probe in 30.0 s"
    )
    assert decision.rule == "escalate"


async def test_half_open_probe_is_one_request_and_its_success_closes_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, cool_down_s=10, clock=clock)
    service = Service(status(500), status(500), status(500), status(500), ok())
    async with decision_client(service, breaker=breaker, max_attempts=2) as client:
        await client.decide(incident(), CANDIDATES)
        await client.decide(incident(), CANDIDATES)
        assert (breaker.state, service.calls) == ("open", 4)
        clock.advance(10)
        assert breaker.state == "half_open"
        decision = await client.decide(incident(), CANDIDATES)
    assert (decision.source, breaker.state, service.calls) == ("sira", "closed", 5)


async def test_failed_probe_is_not_retried_and_reopens_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down_s=10, clock=clock)
    service = Service(status(500))
    async with decision_client(service, breaker=breaker, max_attempts=3) as client:
        await client.decide(incident(), CANDIDATES)
        assert (breaker.state, service.calls) == ("open", 3)
        clock.advance(10)
        decision = await client.decide(incident(), CANDIDATES)
        assert service.calls == 4  # the probe: one request, no retries
        assert decision.fallback_reason == "HTTP 500 from the decision service (1 attempt)"
        assert breaker.state == "open"
        await client.decide(incident(), CANDIDATES)
        assert service.calls == 4


async def test_concurrent_decisions_send_one_probe_while_half_open() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cool_down_s=10, clock=clock)
    release = asyncio.Event()

    async def answer_when_released(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return ok()

    service = Service(status(500), answer_when_released)
    async with decision_client(service, breaker=breaker, max_attempts=1) as client:
        await client.decide(incident(), CANDIDATES)
        clock.advance(10)
        probe = asyncio.create_task(client.decide(incident(), CANDIDATES))
        await asyncio.sleep(0.01)
        others = [await client.decide(incident(), CANDIDATES) for _ in range(3)]
        release.set()
        decision = await probe
    assert [d.fallback_reason for d in others] == [
        "circuit breaker half-open, its one probe in flight"
    ] * 3
    assert decision.source == "sira"
    assert service.calls == 2
    assert breaker.state == "closed"


# --- feedback --------------------------------------------------------------------------------

FEEDBACK = Feedback(
    incident_id="inc-1",
    attempt_id="att-1",
    incident_type="webhook_fail_rate",
    plugin="payments",
    from_version="1.2.2",
    to_version="1.2.3",
    decision_source="sira",
    confidence=0.87,
    outcome="success",
)


async def test_feedback_is_posted() -> None:
    service = Service(httpx.Response(202, json={"stored": 1}))
    async with decision_client(service) as client:
        await client.send_feedback(FEEDBACK)
    [request] = service.requests
    assert str(request.url) == f"{SIRA}/api/sira/feedback"
    assert json.loads(request.content) == FEEDBACK.as_json()


@pytest.mark.parametrize(
    ("response", "retryable"),
    [
        (status(500), True),
        (status(429), True),
        (status(401), True),
        (status(422), False),
        (httpx.ConnectError("refused"), True),
    ],
)
async def test_undelivered_feedback_says_whether_to_retry(
    response: httpx.Response | Exception, retryable: bool
) -> None:
    async with decision_client(Service(response)) as client:
        with pytest.raises(FeedbackNotDelivered) as raised:
            await client.send_feedback(FEEDBACK)
    assert raised.value.retryable is retryable


async def test_feedback_without_a_service_is_not_retried() -> None:
    async with decision_client(Service(ok()), base_url=None) as client:
        with pytest.raises(FeedbackNotDelivered) as raised:
            await client.send_feedback(FEEDBACK)
    assert raised.value.retryable is False


# --- fallback heuristics ---------------------------------------------------------------------

RULES = FallbackRules(regression_window=timedelta(hours=1), min_samples=3, min_success_rate=0.5)


def fallback(**overrides: Any) -> Any:
    values: dict[str, Any] = {
        "reason": "HTTP 500 from the decision service (3 attempts)",
        "incident_type": "webhook_fail_rate",
        "current_version": "1.2.2",
        "previous_version": "1.2.1",
        "version_changed_at": None,
        "detected_at": DETECTED,
        "candidates": ["1.2.3", "1.2.4"],
        "outcomes": {},
        "quarantined": frozenset(),
        "rules": RULES,
    }
    values.update(overrides)
    return decide_without_service(**values)


def test_rollback_after_update_fires_within_the_window() -> None:
    decision = fallback(version_changed_at=DETECTED - timedelta(minutes=6))
    assert (decision.action, decision.patch_version, decision.rule, decision.source) == (
        "rollback",
        "1.2.1",
        "rollback_after_update",
        "fallback",
    )
    assert decision.confidence == 0.87  # 0.9 fresh, 0.6 at the end of the window
    assert decision.explanation == (
        "Decision service unavailable (HTTP 500 from the decision service (3 attempts)); "
        "fallback rule 'rollback after update': webhook_fail_rate detected 6 min after the "
        "change from 1.2.1 to 1.2.2 (window 60 min); rolling back to 1.2.1."
    )


def test_rollback_confidence_fades_over_the_window() -> None:
    fresh = fallback(version_changed_at=DETECTED)
    stale = fallback(version_changed_at=DETECTED - timedelta(hours=1))
    assert (fresh.confidence, stale.confidence) == (0.9, 0.6)


@pytest.mark.parametrize(
    "overrides",
    [
        {"version_changed_at": DETECTED - timedelta(hours=1, seconds=1)},  # too long ago
        {"version_changed_at": DETECTED + timedelta(minutes=1)},  # changed after detection
        {"version_changed_at": DETECTED, "previous_version": None},
        {"version_changed_at": DETECTED, "previous_version": "1.2.2"},  # same as current
        {"version_changed_at": DETECTED, "quarantined": frozenset({"1.2.1"})},
        {"version_changed_at": None},
    ],
)
def test_rollback_after_update_does_not_fire_otherwise(overrides: dict[str, Any]) -> None:
    assert fallback(**overrides).rule == "escalate"


def test_a_regression_from_detection_rolls_back_without_a_timestamp() -> None:
    decision = fallback(incident_type="regression")
    assert (decision.action, decision.patch_version, decision.confidence) == (
        "rollback",
        "1.2.1",
        0.75,
    )


def test_a_silent_installation_is_escalated_even_after_an_update() -> None:
    decision = fallback(
        incident_type="heartbeat_missed",
        version_changed_at=DETECTED,
        outcomes={"1.2.3": OutcomeStats(successes=50)},
    )
    assert (decision.action, decision.patch_version, decision.rule, decision.confidence) == (
        "escalate",
        None,
        "silent_installation",
        0.0,
    )


def test_best_observed_candidate_is_patched() -> None:
    decision = fallback(
        outcomes={
            "1.2.3": OutcomeStats(successes=19, failures=1),
            "1.2.4": OutcomeStats(successes=3, failures=0),  # 100%, but thin evidence
        }
    )
    assert (decision.action, decision.patch_version, decision.rule) == (
        "patch",
        "1.2.3",
        "best_observed_candidate",
    )
    assert decision.confidence == round(wilson_lower_bound(OutcomeStats(19, 1)), 3) == 0.764
    assert decision.explanation == (
        "Decision service unavailable (HTTP 500 from the decision service (3 attempts)); "
        "fallback rule 'best observed candidate': 1.2.3 healed 19 of 20 webhook_fail_rate "
        "incidents (95%; 95% lower bound 0.76, used as confidence)."
    )


@pytest.mark.parametrize(
    ("outcomes", "quarantined"),
    [
        ({"1.2.3": OutcomeStats(successes=2)}, frozenset()),  # below min samples
        ({"1.2.3": OutcomeStats(successes=4, failures=6)}, frozenset()),  # below min rate
        ({"1.2.3": OutcomeStats(successes=20)}, frozenset({"1.2.3"})),  # quarantined
        ({"1.2.2": OutcomeStats(successes=20)}, frozenset()),  # the current version
        ({"1.3.0": OutcomeStats(successes=20)}, frozenset()),  # not a candidate
    ],
)
def test_best_observed_candidate_does_not_fire_otherwise(
    outcomes: dict[str, OutcomeStats], quarantined: frozenset[str]
) -> None:
    candidates = ["1.2.2", "1.2.3", "1.2.4"]
    decision = fallback(candidates=candidates, outcomes=outcomes, quarantined=quarantined)
    assert decision.rule == "escalate"


def test_rollback_after_update_wins_over_a_proven_candidate() -> None:
    decision = fallback(
        version_changed_at=DETECTED - timedelta(minutes=1),
        outcomes={"1.2.3": OutcomeStats(successes=50)},
    )
    assert decision.rule == "rollback_after_update"


def test_escalation_says_why_nothing_else_applied() -> None:
    decision = fallback(reason="circuit breaker open after 5 consecutive failures")
    assert (decision.action, decision.patch_version, decision.confidence) == (
        "escalate",
        None,
        0.0,
    )
    assert decision.explanation == (
        "Decision service unavailable (circuit breaker open after 5 consecutive failures); "
        "fallback rule 'escalate': no recent version change to undo and no candidate with "
        "at least 3 observed outcomes for webhook_fail_rate and a success rate of 50% or more."
    )


def test_wilson_lower_bound_grows_with_evidence() -> None:
    assert wilson_lower_bound(OutcomeStats()) == 0.0
    assert round(wilson_lower_bound(OutcomeStats(successes=3)), 3) == 0.438
    assert round(wilson_lower_bound(OutcomeStats(successes=100)), 3) == 0.963


class Streamed:
    """An answer of `size` bytes streamed in pieces, counting what the client pulled."""

    def __init__(self, head: bytes, size: int, piece: int = 16 * 1024) -> None:
        self.head, self.size, self.piece = head, size, piece
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        self.pulled = len(self.head)
        while self.pulled < self.size:
            self.pulled += self.piece
            yield b"x" * self.piece


async def test_an_oversize_answer_falls_back_without_reading_the_rest() -> None:
    answer = Streamed(b'{"action": "patch", "explanation": "', 8 * 1024 * 1024)
    service = Service(httpx.Response(200, content=answer))
    async with decision_client(service) as client:
        decision = await client.decide(incident(), CANDIDATES)
    assert decision.source == "fallback"
    assert decision.fallback_reason == "nonsense answer: body larger than 65536 bytes"
    assert answer.pulled <= 65536 + answer.piece
    assert service.calls == 1  # not retried: the same nonsense would come back


async def test_the_answer_limit_is_the_setting() -> None:
    from app.core.settings import Settings
    from workers.main import service_clients

    settings = Settings(sira_api_url=SIRA, service_answer_max_bytes=2048, _env_file=None)
    big = ok(answer(explanation="because " * 400))  # valid, but over 2 KiB
    async with httpx.AsyncClient(transport=httpx.MockTransport(Service(big))) as http:
        client, _ = service_clients(settings, http)
        decision = await client.decide(incident(), CANDIDATES)
    assert decision.fallback_reason == "nonsense answer: body larger than 2048 bytes"


async def test_feedback_reads_nothing_of_the_answer() -> None:
    """Only the status of a feedback's answer matters: a service answering it with megabytes
    (or without end) is not read."""
    answer = Streamed(b"{", 8 * 1024 * 1024)
    async with decision_client(Service(httpx.Response(200, content=answer))) as client:
        await client.send_feedback(FEEDBACK)
    assert answer.pulled <= answer.piece
