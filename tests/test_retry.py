"""app/core/retry.py on its own: what ends the tries and what the caller is told. The decision
and staging clients' own rules are pinned in test_decisions.py and test_staging_client.py."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from app.core.retry import GaveUp, Retryable, retry_within_deadline

pytestmark = pytest.mark.no_services


class Tries:
    """An attempt that fails with `Retryable` until its turn `succeed_at` (never if 0)."""

    def __init__(self, succeed_at: int = 0) -> None:
        self.succeed_at = succeed_at
        self.remaining: list[float] = []

    async def __call__(self, remaining: float) -> str:
        self.remaining.append(remaining)
        if len(self.remaining) == self.succeed_at:
            return "answer"
        raise Retryable(f"failure {len(self.remaining)}")


class Ceilings(random.Random):
    """Records each pause's ceiling and pauses not at all."""

    def __init__(self) -> None:
        super().__init__()
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.ceilings.append(b)
        return 0.0


async def test_the_first_answer_is_returned() -> None:
    tries = Tries(succeed_at=2)
    result = await retry_within_deadline(tries, deadline_s=5, max_attempts=3, backoff_base_s=0)
    assert result == "answer"
    assert len(tries.remaining) == 2
    assert 0 < tries.remaining[1] <= tries.remaining[0] <= 5


async def test_after_max_attempts_the_last_reason_and_the_count() -> None:
    with pytest.raises(GaveUp) as gave_up:
        await retry_within_deadline(Tries(), deadline_s=5, max_attempts=3, backoff_base_s=0)
    assert (gave_up.value.reason, gave_up.value.attempts) == ("failure 3", 3)


async def test_backoff_doubles_up_to_its_cap_with_jitter_below_it() -> None:
    jitter = Ceilings()
    with pytest.raises(GaveUp):
        await retry_within_deadline(
            Tries(),
            deadline_s=5,
            max_attempts=5,
            backoff_base_s=0.01,
            backoff_max_s=0.03,
            jitter=jitter,
        )
    assert jitter.ceilings == [0.01, 0.02, 0.03, 0.03]  # none after the last try


async def test_a_pause_that_would_reach_the_deadline_is_not_taken() -> None:
    started = time.monotonic()
    with pytest.raises(GaveUp) as gave_up:
        await retry_within_deadline(Tries(), deadline_s=0.2, max_attempts=3, backoff_base_s=0.5)
    assert time.monotonic() - started < 0.1
    assert (gave_up.value.reason, gave_up.value.attempts) == ("failure 1", 1)


async def test_a_try_cut_off_by_the_deadline_ends_the_tries() -> None:
    calls = 0

    async def hang(remaining: float) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(30)
        return "late"

    with pytest.raises(GaveUp) as gave_up:
        await retry_within_deadline(hang, deadline_s=0.1, max_attempts=3, backoff_base_s=0)
    assert (gave_up.value.reason, gave_up.value.attempts, calls) == (
        "no answer within the 0.1 s deadline",
        1,
        1,
    )


async def test_stop_early_adds_its_reason() -> None:
    tries = Tries()
    with pytest.raises(GaveUp) as gave_up:
        await retry_within_deadline(
            tries,
            deadline_s=5,
            max_attempts=3,
            backoff_base_s=0,
            stop_early=lambda: "circuit opened meanwhile",
        )
    assert gave_up.value.reason == "failure 1; circuit opened meanwhile"
    assert gave_up.value.attempts == 1


async def test_other_exceptions_pass_through_untried_again() -> None:
    calls = 0

    async def refused(remaining: float) -> str:
        nonlocal calls
        calls += 1
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        await retry_within_deadline(refused, deadline_s=5, max_attempts=3, backoff_base_s=0)
    assert calls == 1


async def test_no_time_no_try() -> None:
    tries = Tries()
    with pytest.raises(GaveUp) as gave_up:
        await retry_within_deadline(tries, deadline_s=0, max_attempts=3, backoff_base_s=0)
    assert (gave_up.value.reason, gave_up.value.attempts, tries.remaining) == (
        "no attempt made",
        0,
        [],
    )
