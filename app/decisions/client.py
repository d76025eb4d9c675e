"""The worker's client of the decision service (docs/contracts.md, "Decision service").

`DecisionClient.decide` always returns a decision and never raises for the service's sake:
when the service is unconfigured, refused by the circuit breaker, unreachable, slow, failing
or talking nonsense, the fallback heuristics decide and the decision says so.

One decision gets one total deadline (default 3 s) that covers every retry and backoff
sleep, so a worker's step is bounded whatever the service does (app/core/retry.py). Within it:
- connect errors, timeouts and 5xx are retried with exponential backoff and full jitter
  (jitter keeps N workers that failed together from retrying together);
- 4xx is not retried: the same request would be refused the same way;
- a 2xx whose body does not pass `parse_answer` is not retried either: services that talk
  nonsense tend to repeat it, and the deadline is better spent on the fallback.
A decision that ends without an answer counts as one failure for the circuit breaker; while
the breaker probes a half-open circuit, the probe is a single request without retries."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import orjson
import structlog

from app.core.retry import GaveUp, Retryable, retry_within_deadline
from app.core.states import Action
from app.decisions.breaker import Admission, BreakerState, CircuitBreaker
from app.decisions.fallback import FallbackRules, decide_without_service
from app.decisions.schemas import (
    Decision,
    Feedback,
    IncidentFacts,
    LocalEvidence,
    NonsenseAnswer,
    SiraAnswer,
    parse_answer,
)

log = structlog.get_logger(__name__)

DECIDE_PATH = "/api/sira/decide"
FEEDBACK_PATH = "/api/sira/feedback"
# Statuses worth retrying later although they are 4xx (outbox only): the token may be
# fixed by ops, a timeout or a rate limit passes.
_FEEDBACK_RETRYABLE_4XX = frozenset({401, 403, 408, 429})


class ServiceUnavailable(Exception):
    """No usable answer; `reason` ends up in the fallback decision's explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FeedbackNotDelivered(Exception):
    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def _log_breaker_change(old: BreakerState, new: BreakerState) -> None:
    log.warning("decision_breaker_changed", old=old, new=new)


class DecisionClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str | None,
        token: str | None,
        deadline_s: float = 3.0,
        max_attempts: int = 3,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 1.0,
        breaker: CircuitBreaker | None = None,
        rules: FallbackRules | None = None,
        max_answer_bytes: int = 64 * 1024,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._http = http
        self._base_url = base_url.rstrip("/") if base_url else None
        self._token = token
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.breaker = breaker or CircuitBreaker(on_change=_log_breaker_change)
        self.rules = rules or FallbackRules()
        self.max_answer_bytes = max_answer_bytes
        self._clock = clock
        self._rng = rng or random.Random()  # jitter needs no secrecy

    @property
    def configured(self) -> bool:
        """False when SIRA_API_URL is unset: every decision comes from the fallback."""
        return self._base_url is not None

    async def decide(
        self,
        incident: IncidentFacts,
        candidates: Sequence[str],
        evidence: LocalEvidence | None = None,
    ) -> Decision:
        evidence = evidence or LocalEvidence()
        # How long the call took, in the fallback's log line: the deadline bounds it
        # (tests/test_decision_slow.py reads it from a real worker's log).
        started = self._clock()
        try:
            answer = await self._ask(incident, candidates, evidence)
        except ServiceUnavailable as failure:
            reason = failure.reason
        except Exception as error:
            # A bug of ours must not leave an incident undecided; the fallback still can.
            log.exception("decision_client_error", incident_id=incident.id)
            reason = f"internal error: {type(error).__name__}: {error}"
        else:
            return Decision(
                Action(answer.action),
                answer.patch_version,
                answer.confidence,
                answer.explanation,
                "sira",
            )
        decision = decide_without_service(
            reason=reason,
            incident_type=incident.type,
            current_version=incident.current_version,
            previous_version=incident.previous_version,
            version_changed_at=evidence.version_changed_at,
            detected_at=incident.detected_at,
            candidates=candidates,
            outcomes=evidence.outcomes,
            quarantined=evidence.quarantined,
            rules=self.rules,
        )
        # Running without a decision service is a choice (development, demos), not news.
        report = log.info if self._base_url is None else log.warning
        report(
            "decision_fallback",
            incident_id=incident.id,
            reason=reason,
            rule=decision.rule,
            action=decision.action,
            breaker=self.breaker.state,
            elapsed_s=round(self._clock() - started, 3),
        )
        return decision

    async def send_feedback(self, feedback: Feedback | Mapping[str, Any]) -> None:
        """One delivery attempt within the deadline; the outbox retries. Raises
        FeedbackNotDelivered, whose `retryable` says whether trying again can help."""
        body = feedback.as_json() if isinstance(feedback, Feedback) else dict(feedback)
        content = orjson.dumps(body)
        if self._base_url is None:
            raise FeedbackNotDelivered(
                "decision service not configured (SIRA_API_URL unset)", retryable=False
            )
        try:
            self._admit()
        except ServiceUnavailable as failure:
            raise FeedbackNotDelivered(failure.reason, retryable=True) from None
        try:
            # Only the status matters: the answer's body is never read (streamed and closed).
            async with (
                asyncio.timeout(self.deadline_s),
                self._http.stream(
                    "POST",
                    self._url(FEEDBACK_PATH),
                    content=content,
                    headers=self._headers(),
                    timeout=self.deadline_s,
                ) as response,
            ):
                pass
        except (TimeoutError, httpx.TimeoutException):
            self.breaker.record_failure()
            raise FeedbackNotDelivered(
                f"no answer within the {self.deadline_s:g} s deadline", retryable=True
            ) from None
        except httpx.HTTPError as error:
            self.breaker.record_failure()
            raise FeedbackNotDelivered(
                f"cannot reach the decision service ({type(error).__name__}: {error})",
                retryable=True,
            ) from None
        if response.is_success:
            self.breaker.record_success()
            return
        # Same rule as for decisions: a call without a usable answer is a failure.
        self.breaker.record_failure()
        status = response.status_code
        raise FeedbackNotDelivered(
            f"HTTP {status} from the decision service",
            retryable=status >= 500 or status in _FEEDBACK_RETRYABLE_4XX,
        )

    async def _ask(
        self, incident: IncidentFacts, candidates: Sequence[str], evidence: LocalEvidence
    ) -> SiraAnswer:
        # Encoded before the breaker is asked, so a payload we cannot encode is our error,
        # not a strike against the service.
        content = orjson.dumps({"incident": incident.as_json(), "candidates": list(candidates)})
        admission = self._admit()
        try:
            answer = await self._ask_within_deadline(
                content,
                attempts=1 if admission == "probe" else self.max_attempts,
                candidates=candidates,
                incident=incident,
                evidence=evidence,
            )
        except Exception:
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return answer

    def _admit(self) -> Admission:
        if self._base_url is None:
            raise ServiceUnavailable("decision service not configured (SIRA_API_URL unset)")
        admission = self.breaker.admit()
        if admission == "reject":
            breaker = self.breaker
            if breaker.state == "half_open":
                raise ServiceUnavailable("circuit breaker half-open, its one probe in flight")
            raise ServiceUnavailable(
                f"circuit breaker open after {breaker.consecutive_failures} "
                f"consecutive failures; next probe in {breaker.retry_in_s():.1f} s"
            )
        return admission

    async def _ask_within_deadline(
        self,
        content: bytes,
        *,
        attempts: int,
        candidates: Sequence[str],
        incident: IncidentFacts,
        evidence: LocalEvidence,
    ) -> SiraAnswer:
        try:
            body = await retry_within_deadline(
                functools.partial(self._post_decide, content),
                deadline_s=self.deadline_s,
                max_attempts=attempts,
                backoff_base_s=self.backoff_base_s,
                backoff_max_s=self.backoff_max_s,
                jitter=self._rng,
                stop_early=self._circuit_opened,
                clock=self._clock,
            )
        except GaveUp as gave_up:
            plural = "s" if gave_up.attempts > 1 else ""
            raise ServiceUnavailable(
                f"{gave_up.reason} ({gave_up.attempts} attempt{plural})"
            ) from None
        try:
            return parse_answer(
                body,
                candidates=candidates,
                previous_version=incident.previous_version,
                quarantined=evidence.quarantined,
            )
        except NonsenseAnswer as nonsense:
            raise ServiceUnavailable(f"nonsense answer: {nonsense}") from None

    def _circuit_opened(self) -> str | None:
        # Other decisions opened the circuit meanwhile: stop adding to the load.
        return "circuit opened meanwhile" if self.breaker.state == "open" else None

    async def _post_decide(self, content: bytes, remaining: float) -> bytes:
        try:
            async with self._http.stream(
                "POST",
                self._url(DECIDE_PATH),
                content=content,
                headers=self._headers(),
                timeout=remaining,
            ) as response:
                status = response.status_code
                if status >= 500:
                    raise Retryable(f"HTTP {status} from the decision service")
                if not response.is_success:
                    hint = " (credentials refused)" if status in (401, 403) else ""
                    raise ServiceUnavailable(f"HTTP {status} from the decision service{hint}")
                return await _read_at_most(response, self.max_answer_bytes)
        except httpx.TimeoutException:
            raise Retryable("decision service timed out") from None
        except httpx.TransportError as error:
            raise Retryable(
                f"cannot reach the decision service ({type(error).__name__}: {error})"
            ) from None
        except httpx.HTTPError as error:
            raise ServiceUnavailable(f"unreadable answer ({type(error).__name__})") from None

    def _url(self, path: str) -> str:
        assert self._base_url is not None  # _admit refuses an unconfigured client first
        return self._base_url + path

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    """A misbehaving service could stream without end; we stop reading past `limit`."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise ServiceUnavailable(f"nonsense answer: body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
