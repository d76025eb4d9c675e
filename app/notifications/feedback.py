"""Attempt outcomes for the decision service's learning: stored in sira_learning_feedback
and queued in the outbox for `POST {SIRA_API_URL}/api/sira/feedback`, in the caller's
transaction (the one that ends the attempt).

Idempotent on the attempt: a healing step that runs twice (a worker died after committing,
a job retried) records and sends the outcome once. The outbox row is written only when the
feedback row is new, so the unique key on sira_learning_feedback.attempt_id is the one
place that decides."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from app.decisions.schemas import Feedback
from app.notifications import repository

TOPIC = "feedback"


async def record_outcome(session: AsyncSession, feedback: Feedback) -> bool:
    """True when this call recorded the outcome (and queued it), False when it was already
    recorded. Concurrent callers serialise on the unique index: the second waits for the
    first to commit and then does nothing."""
    if not await repository.insert_learning_feedback(session, feedback):
        return False
    await repository.queue_feedback(session, topic=TOPIC, payload=feedback.as_json())
    return True
