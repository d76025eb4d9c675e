"""Attempt outcomes for the decision service's learning: stored in sira_learning_feedback
and queued in the outbox for `POST {SIRA_API_URL}/api/sira/feedback`, in the caller's
transaction (the one that ends the attempt).

Idempotent on the attempt: a healing step that runs twice (a worker died after committing,
a job retried) records and sends the outcome once. The outbox row is written only when the
feedback row is new, so the unique key on sira_learning_feedback.attempt_id is the one
place that decides."""

from __future__ import annotations

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.decisions.schemas import Feedback

TOPIC = "feedback"


async def record_outcome(session: AsyncSession, feedback: Feedback) -> bool:
    """True when this call recorded the outcome (and queued it), False when it was already
    recorded. Concurrent callers serialise on the unique index: the second waits for the
    first to commit and then does nothing."""
    inserted = await session.execute(
        text(
            """
            INSERT INTO sira_learning_feedback
                (incident_id, attempt_id, incident_type, plugin_name, from_version,
                 to_version, decision_source, confidence, outcome)
            VALUES (CAST(:incident_id AS uuid), CAST(:attempt_id AS uuid), :incident_type,
                    :plugin_name, :from_version, :to_version, :decision_source, :confidence,
                    :outcome)
            ON CONFLICT (attempt_id) DO NOTHING
            RETURNING id
            """
        ),
        {
            "incident_id": feedback.incident_id,
            "attempt_id": feedback.attempt_id,
            "incident_type": feedback.incident_type,
            "plugin_name": feedback.plugin,
            "from_version": feedback.from_version,
            "to_version": feedback.to_version,
            "decision_source": feedback.decision_source,
            "confidence": feedback.confidence,
            "outcome": feedback.outcome,
        },
    )
    if inserted.first() is None:
        return False
    await session.execute(
        text(
            "INSERT INTO outbox (kind, topic, payload)"
            " VALUES ('feedback', :topic, CAST(:payload AS jsonb))"
        ),
        {"topic": TOPIC, "payload": orjson.dumps(feedback.as_json()).decode()},
    )
    return True
