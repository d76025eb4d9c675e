"""One deadline for a call to another service, covering every try and every pause between tries:
the decision service's client (app/decisions/client.py) and the staging runner's client
(app/healing/staging.py) use it, so a worker's step is bounded whatever the service does.

`retry_within_deadline(attempt, ...)` awaits `attempt(remaining_s)` until a try returns:
- each try gets what is left of the deadline as its own limit, enforced by `asyncio.timeout`
  (the caller also hands it to httpx: httpx's timeouts apply per socket operation, and a
  server dripping bytes would slip through them);
- a try that raises `Retryable` is tried again after a pause: `backoff_base_s * 2 ** (n - 1)`
  after the n-th try, at most `backoff_max_s`; with `jitter` (a Random), a uniform draw below
  that ("full jitter": N workers that failed together do not retry together);
- a try that raises TimeoutError (the deadline cut it off, or the caller says its own timeout
  ran out) ends the tries: the next one would get no time;
- any other exception is the caller's answer and passes through, not retried;
- the tries also end after `max_attempts`, when `stop_early()` gives a reason (added to the
  last try's), and when the next pause would reach the deadline: there is no pause after the
  last try, nor one that ends at the deadline, since either would only delay the same failure.
Then `GaveUp(reason, attempts)` is raised with the last try's reason ("no answer within the
N s deadline" after a timeout, "no attempt made" when the deadline had passed before any try)
and the number of tries made. Each client turns it into its own error.

The two loops this replaced, for the record:
- Decision client (`DecisionClient._ask_within_deadline`): deadline 3 s and 3 tries by
  default, one try while the breaker probes. Per try: the time left, as asyncio.timeout and as
  httpx's timeout. Retried: connect and transport errors, httpx timeouts (reason "decision
  service timed out"), 5xx. Not retried: 4xx, an unreadable or oversized body, and a 2xx that
  fails `parse_answer` (nonsense). Backoff: full jitter below min(1 s, 0.1 s * 2**(n-1)), from
  an injectable Random; no pause after the last try; no pause when it would reach the
  deadline (the loop gave up instead); stopped early, with "; circuit opened meanwhile", when
  other decisions had opened the breaker. The deadline cutting a try off ended the loop.
  Error: ServiceUnavailable("<reason> (<n> attempt[s])"). Kept as is, but for one count: when
  the deadline had passed at the top of the loop (after a pause, by a late wake-up) the old n
  counted the try not made; n is now the tries made.
- Staging client (`StagingClient._call`): deadline 5 s, 3 tries. Per try: the time left, as
  asyncio.timeout and as httpx's timeout. Retried: connect and transport errors, 5xx. Any
  timeout, asyncio's or httpx's, ended the loop with "no answer within the N s deadline"
  (httpx's timeout equals the time left, so it only fires when the deadline is reached). Not
  retried: a 404 on GET (RunLost), other answers below 500 (parsed: 4xx and nonsense are
  StagingUnavailable). Backoff: 0.1 s * 2**(n-1), no jitter, no cap, but cut to the time left.
  Error: StagingUnavailable(<reason>). Kept as is (the tries made and the errors are the same),
  but for the pauses: the old loop also slept after its last try, and slept until the deadline
  when the pause was longer than the time left, before raising the same error; now that
  error comes without those waits, as in the decision client."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class Retryable(Exception):
    """Raised by a try that may succeed if made again; `reason` says what went wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GaveUp(Exception):
    """No try returned within the deadline and the number of tries allowed."""

    def __init__(self, reason: str, attempts: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


async def retry_within_deadline(
    attempt: Callable[[float], Awaitable[T]],
    *,
    deadline_s: float,
    max_attempts: int,
    backoff_base_s: float,
    backoff_max_s: float = math.inf,
    jitter: random.Random | None = None,
    stop_early: Callable[[], str | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`attempt(remaining_s)`'s first result; see the module docstring for the rules."""
    started = clock()
    reason = "no attempt made"
    made = 0
    while made < max_attempts:
        remaining = deadline_s - (clock() - started)
        if remaining <= 0:
            break
        made += 1
        try:
            async with asyncio.timeout(remaining):
                return await attempt(remaining)
        except TimeoutError:
            raise GaveUp(f"no answer within the {deadline_s:g} s deadline", made) from None
        except Retryable as failure:
            reason = failure.reason
        if made == max_attempts:
            break
        note = stop_early() if stop_early is not None else None
        if note:
            reason = f"{reason}; {note}"
            break
        pause = min(backoff_max_s, backoff_base_s * 2 ** (made - 1))
        if jitter is not None:
            pause = jitter.uniform(0, pause)
        if clock() - started + pause >= deadline_s:
            break
        await asyncio.sleep(pause)
    raise GaveUp(reason, made)
