"""The facts of an incident as the decision client sends them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.decisions import IncidentFacts

DETECTED = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def incident(**overrides: Any) -> IncidentFacts:
    values: dict[str, Any] = {
        "id": "inc-1",
        "type": "webhook_fail_rate",
        "severity": "medium",
        "tenant_id": "merchant-1",
        "plugin": "payments",
        "current_version": "1.2.2",
        "previous_version": "1.2.1",
        "telemetry_snapshot": {"webhook_attempts": 50, "webhook_failures": 30},
        "detected_at": DETECTED,
    }
    values.update(overrides)
    return IncidentFacts(**values)
