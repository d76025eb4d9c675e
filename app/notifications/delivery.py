"""Delivery of the outbox: notifications to webhooks, feedback to the decision service.

`deliver_due` is one pass, run by the worker every tick; any number of workers may run it at
once. The steps and why:

1. Claim, in one short transaction: due rows (`next_attempt_at <= now()`, neither delivered
   nor dead) `FOR UPDATE SKIP LOCKED`, and push their `next_attempt_at` forward by a lease.
   Concurrent passes split the rows instead of waiting for each other; after the commit no
   other pass sees the rows until the lease ends, so two workers never send a row at the
   same time, and a worker killed mid-send leaves rows that become due again when the lease
   ends. No transaction is open while we wait for HTTP.
2. Send, outside any transaction: webhooks concurrently (bounded), feedback one after the
   other through `DecisionClient`, whose circuit breaker then sees the calls in order.
3. Record each outcome in its own short transaction, fenced by the lease: the UPDATE only
   applies while `next_attempt_at` still holds the value our claim wrote, so a pass that
   overran its lease cannot overwrite the outcome of the pass that took the row over.

Delivery is at least once: a worker that dies after the receiver answered but before the
outcome is recorded sends the row again. Receivers deduplicate on `X-Selfheal-Delivery`.

Outcomes: 2xx -> delivered. Network errors, timeouts, 5xx, 408, 429 and redirects (never
followed: the request is signed for the URL ops registered) -> retried after an exponential
backoff with full jitter (jitter keeps rows that failed together from retrying together),
at least what a Retry-After asks, at most `max_backoff_s`. Other 4xx -> dead at once: the
receiver refused this request and would refuse it again. A row whose attempts reach
`max_attempts` is dead too, and keeps its last error.

Feedback rows need the decision service: while it is not configured they are not claimed
at all, and while the client's circuit breaker is open they are put back without counting
an attempt (the breaker already knows the service is down; burning attempts would only kill
the rows sooner)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.crypto import SecretBox
from app.core.errors import Invalid
from app.decisions.client import DecisionClient, FeedbackNotDelivered
from app.notifications import repository
from app.notifications.egress import DestinationRefused, WebhookClient
from app.notifications.repository import ClaimedRow, DeliveryEndpoint
from app.notifications.service import open_secret
from app.notifications.signing import sign

log = structlog.get_logger(__name__)

MAX_ERROR_CHARS = 500
USER_AGENT = "selfheal-webhooks/1"
# Statuses worth retrying although they are 4xx: a timeout or a rate limit passes.
_RETRYABLE_4XX = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    # Claimed but not attempted (breaker open, lease nearly over): back in the queue, no
    # attempt counted.
    deferred: int = 0


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: Literal["delivered", "retry", "dead", "defer"]
    error: str | None = None
    # The least delay before the next try (Retry-After, breaker cool-down).
    wait_s: float = 0.0
    # False when no request was made (endpoint gone or disabled, secret unreadable, deferred).
    attempted: bool = True


async def deliver_due(
    maker: async_sessionmaker[AsyncSession],
    webhooks: WebhookClient,
    box: SecretBox,
    *,
    decision_client: DecisionClient | None,
    limit: int = 100,
    max_attempts: int = 12,
    base_backoff_s: float = 1.0,
    max_backoff_s: float = 600.0,
    request_timeout_s: float = 5.0,
    lease_s: float | None = None,
    concurrency: int = 8,
    rng: random.Random | None = None,
) -> DeliveryResult:
    """One delivery pass over at most `limit` due rows, webhooks sent through `webhooks`
    (app/notifications/egress.py: every connection goes to a checked address). Never raises for a row's sake (a
    receiver, a payload, a recording that fails is logged and the pass goes on); a failure
    to claim (database down) propagates, and the next pass tries again.

    `lease_s` (default: the longer of 30 s and four request timeouts) must exceed the
    request timeout; `concurrency` bounds simultaneous webhook requests, and with them the
    database connections used to record outcomes. `rng` makes the jitter reproducible."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    lease = lease_s if lease_s is not None else max(30.0, 4 * request_timeout_s)
    if lease <= request_timeout_s:
        raise ValueError("lease_s must be longer than request_timeout_s")
    feedback_on = _feedback_configured(decision_client)
    async with maker() as session, session.begin():
        rows, endpoints = await _claim(
            session, limit=limit, lease_s=lease, include_feedback=feedback_on
        )
    if not rows:
        return DeliveryResult()
    delivery = _Pass(
        maker=maker,
        webhooks=webhooks,
        box=box,
        endpoints=endpoints,
        max_attempts=max_attempts,
        base_backoff_s=base_backoff_s,
        max_backoff_s=max_backoff_s,
        request_timeout_s=request_timeout_s,
        lease_s=lease,
        rng=rng or random.Random(),  # jitter needs no secrecy
    )
    gate = asyncio.Semaphore(max(1, concurrency))
    jobs: list[Awaitable[None]] = []
    feedback_rows: list[ClaimedRow] = []
    for row in rows:
        if row.kind == "notification":
            jobs.append(delivery.webhook(row, gate))
        elif row.kind == "feedback":
            feedback_rows.append(row)
        else:  # the table's CHECK forbids it
            jobs.append(
                delivery.finish(row, _Outcome("dead", f"unknown kind {row.kind!r}", 0.0, False))
            )
    if feedback_rows and decision_client is not None:
        jobs.append(delivery.feedback(decision_client, feedback_rows))
    for failure in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(failure, BaseException):
            log.error("outbox_delivery_bug", error=f"{type(failure).__name__}: {failure}")
    counts = delivery.counts
    return DeliveryResult(
        delivered=counts["delivered"],
        retried=counts["retry"],
        dead=counts["dead"],
        deferred=counts["defer"],
    )


class _Pass:
    """The state of one `deliver_due` pass after its claim."""

    def __init__(
        self,
        *,
        maker: async_sessionmaker[AsyncSession],
        webhooks: WebhookClient,
        box: SecretBox,
        endpoints: Mapping[uuid.UUID, DeliveryEndpoint],
        max_attempts: int,
        base_backoff_s: float,
        max_backoff_s: float,
        request_timeout_s: float,
        lease_s: float,
        rng: random.Random,
    ) -> None:
        self.maker = maker
        self.webhooks = webhooks
        self.box = box
        self.endpoints = endpoints
        self.max_attempts = max_attempts
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.request_timeout_s = request_timeout_s
        self.lease_s = lease_s
        self.rng = rng
        self.claimed_at = time.monotonic()
        self.counts = {"delivered": 0, "retry": 0, "dead": 0, "defer": 0}
        self._secrets: dict[uuid.UUID, str | None] = {}

    def lease_left_s(self) -> float:
        return self.lease_s - (time.monotonic() - self.claimed_at)

    async def webhook(self, row: ClaimedRow, gate: asyncio.Semaphore) -> None:
        async with gate:
            # A send that could outlive the lease might overlap with the pass that takes
            # the row over: leave it to that pass instead.
            if self.lease_left_s() < self.request_timeout_s + 1:
                outcome = _Outcome("defer", "lease nearly over", 0.0, False)
            else:
                outcome = await _guard(row, self._send_webhook(row))
            await self.finish(row, outcome)

    async def feedback(self, client: DecisionClient, rows: list[ClaimedRow]) -> None:
        """One after the other: the breaker sees each result before the next call, so a dead
        service costs `failure_threshold` attempts, not one per row."""
        for row in rows:
            breaker = client.breaker
            if breaker.state == "open":
                outcome = _Outcome(
                    "defer", "decision service circuit open", breaker.retry_in_s(), False
                )
            elif self.lease_left_s() < client.deadline_s + 1:
                outcome = _Outcome("defer", "lease nearly over", 0.0, False)
            else:
                outcome = await _guard(row, _send_feedback(client, row))
            await self.finish(row, outcome)

    async def _send_webhook(self, row: ClaimedRow) -> _Outcome:
        endpoint = self.endpoints.get(row.endpoint_id) if row.endpoint_id else None
        if row.endpoint_id is None or endpoint is None:
            return _Outcome("dead", "no endpoint for this notification", 0.0, False)
        if endpoint.disabled:
            return _Outcome("dead", "endpoint disabled", 0.0, False)
        secret = self._secret(row.endpoint_id, endpoint)
        if secret is None:
            return _Outcome(
                "dead",
                "endpoint secret unreadable (SELFHEAL_SECRET_KEY changed?); add the endpoint again",
                0.0,
                False,
            )
        try:
            self.webhooks.policy.check_url_syntax(endpoint.url)
        except Invalid as refused:
            # Stored before the rule (or SELFHEAL_ENV changed since): never sent.
            return _Outcome("dead", refused.message, 0.0, False)
        return await _post_webhook(
            self.webhooks.http,
            row.id,
            row.topic,
            row.payload,
            endpoint.url,
            secret,
            timeout_s=self.request_timeout_s,
        )

    def _secret(self, endpoint_id: uuid.UUID, endpoint: DeliveryEndpoint) -> str | None:
        if endpoint_id not in self._secrets:
            try:
                self._secrets[endpoint_id] = open_secret(self.box, endpoint_id, endpoint.secret_enc)
            except Exception:
                log.error("notification_endpoint_secret_unreadable", endpoint_id=str(endpoint_id))
                self._secrets[endpoint_id] = None
        return self._secrets[endpoint_id]

    async def finish(self, row: ClaimedRow, outcome: _Outcome) -> None:
        """Count, log and record one row's outcome in its own short transaction."""
        if outcome.status == "retry" and row.attempts + 1 >= self.max_attempts:
            outcome = _Outcome(
                "dead", f"{outcome.error} (gave up after {self.max_attempts} attempts)"
            )
        delay = 0.0
        if outcome.status == "retry":
            # Full jitter over an exponential ceiling; a Retry-After is a floor.
            ceiling = min(self.max_backoff_s, self.base_backoff_s * 2 ** min(row.attempts, 60))
            delay = max(self.rng.uniform(0, ceiling), min(outcome.wait_s, self.max_backoff_s))
        elif outcome.status == "defer":
            delay = min(outcome.wait_s, self.max_backoff_s)
        self.counts[outcome.status] += 1
        _log_outcome(row, outcome, delay)
        try:
            async with self.maker() as session, session.begin():
                await _record(session, row, outcome, delay)
        except Exception:
            # The lease ends and the row is sent again: at least once, never lost.
            log.exception("outbox_record_failed", outbox_id=row.id, outcome=outcome.status)


async def _post_webhook(
    http: httpx.AsyncClient,
    delivery_id: int,
    event: str,
    payload: Mapping[str, Any],
    url: str,
    secret: str,
    *,
    timeout_s: float,
) -> _Outcome:
    """One signed POST. The answer's body is not read beyond a short excerpt for the error
    message: a receiver cannot make us download anything large."""
    body = webhook_body(delivery_id, event, payload)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Selfheal-Event": event,
        "X-Selfheal-Delivery": str(delivery_id),
        "X-Selfheal-Timestamp": timestamp,
        "X-Selfheal-Signature": sign(secret, timestamp, body),
    }
    try:
        # asyncio.timeout bounds the whole exchange; httpx's timeouts apply per socket
        # operation, and a receiver dripping bytes would slip through them.
        async with (
            asyncio.timeout(timeout_s),
            http.stream(
                "POST",
                url,
                content=body,
                headers=headers,
                timeout=timeout_s,
                follow_redirects=False,
            ) as response,
        ):
            status = response.status_code
            if response.is_success:
                return _Outcome("delivered")
            excerpt = await _excerpt(response)
            retry_after = _retry_after(response.headers.get("retry-after"))
    except DestinationRefused as refused:
        # Found when connecting (the name resolves elsewhere now): no connection was made,
        # and the same destination would be refused again.
        return _Outcome("dead", f"destination refused: {refused}", 0.0, False)
    except (TimeoutError, httpx.TimeoutException):
        return _Outcome("retry", f"no answer within {timeout_s:g} s")
    except httpx.HTTPError as error:
        return _Outcome("retry", f"{type(error).__name__}: {error}")
    reason = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        return _Outcome("dead", reason + " (refused; not retried)")
    if 300 <= status < 400:
        reason += " (redirects are not followed)"
    return _Outcome("retry", reason, retry_after)


def webhook_body(delivery_id: int, event: str, payload: Mapping[str, Any]) -> bytes:
    """The JSON sent: the stored payload with `delivery_id`, event first for readability."""
    rest = {k: v for k, v in payload.items() if k not in ("event", "delivery_id")}
    return orjson.dumps(
        {"event": payload.get("event", event), "delivery_id": str(delivery_id), **rest}
    )


async def _send_feedback(client: DecisionClient, row: ClaimedRow) -> _Outcome:
    try:
        await client.send_feedback(row.payload)
    except FeedbackNotDelivered as failure:
        return _Outcome("retry" if failure.retryable else "dead", failure.reason)
    return _Outcome("delivered")


async def _guard(row: ClaimedRow, send: Awaitable[_Outcome]) -> _Outcome:
    """A bug or a surprise in one send is that row's retry, not the end of the pass."""
    try:
        return await send
    except Exception as error:
        log.exception("outbox_send_error", outbox_id=row.id, kind=row.kind)
        return _Outcome("retry", f"internal error: {type(error).__name__}: {error}")


def _feedback_configured(client: DecisionClient | None) -> bool:
    """DecisionClient has no public flag for "SIRA_API_URL is set"; its send_feedback
    refuses for good (retryable=False) without it, which would kill every feedback row of a
    deployment that simply runs without a decision service. So such rows are not claimed."""
    return client is not None and client.configured


async def _claim(
    session: AsyncSession, *, limit: int, lease_s: float, include_feedback: bool
) -> tuple[list[ClaimedRow], dict[uuid.UUID, DeliveryEndpoint]]:
    rows = await repository.claim_due(
        session, limit=limit, lease_s=lease_s, include_feedback=include_feedback
    )
    endpoint_ids = list({r.endpoint_id for r in rows if r.endpoint_id is not None})
    endpoints: dict[uuid.UUID, DeliveryEndpoint] = {}
    if endpoint_ids:
        endpoints = await repository.endpoints_for_delivery(session, endpoint_ids)
    return rows, endpoints


async def _record(
    session: AsyncSession, row: ClaimedRow, outcome: _Outcome, delay_s: float
) -> None:
    error = _truncate(outcome.error)
    if outcome.status == "delivered":
        await repository.mark_delivered(session, row)
    elif outcome.status == "dead":
        await repository.mark_dead(session, row, error=error, attempted=outcome.attempted)
    elif outcome.status == "retry":
        await repository.schedule_retry(session, row, error=error, delay_s=delay_s)
    else:  # defer: no attempt was made
        await repository.put_back(session, row, delay_s=delay_s)


def _log_outcome(row: ClaimedRow, outcome: _Outcome, delay_s: float) -> None:
    fields: dict[str, Any] = {
        "outbox_id": row.id,
        "kind": row.kind,
        "topic": row.topic,
        "attempts": row.attempts + int(outcome.attempted and outcome.status != "defer"),
    }
    if row.endpoint_id is not None:
        fields["endpoint_id"] = str(row.endpoint_id)
    if outcome.status == "delivered":
        log.debug("outbox_delivered", **fields)
    elif outcome.status == "retry":
        log.warning(
            "outbox_delivery_failed", error=outcome.error, retry_in_s=round(delay_s, 3), **fields
        )
    elif outcome.status == "dead":
        log.error("outbox_delivery_dead", error=outcome.error, **fields)
    else:
        log.info(
            "outbox_delivery_deferred", reason=outcome.error, retry_in_s=round(delay_s, 3), **fields
        )


async def _excerpt(response: httpx.Response, limit: int = 200) -> str:
    """The start of an error answer, for last_error; never more than a few kilobytes read."""
    chunks: list[bytes] = []
    size = 0
    with contextlib.suppress(httpx.HTTPError):
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= 4096:
                break
    text_ = b"".join(chunks)[:limit].decode("utf-8", "replace")
    return " ".join(text_.split())


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (the HTTP-date form is rare for webhooks and ignored)."""
    if not value:
        return 0.0
    try:
        seconds = float(value.strip())
    except ValueError:
        return 0.0
    return seconds if 0 <= seconds < 1e9 else 0.0


def _truncate(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.replace("\x00", "")
    return value if len(value) <= MAX_ERROR_CHARS else value[: MAX_ERROR_CHARS - 1] + "…"
