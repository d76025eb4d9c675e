"""The action an incident waits to take (plugin_incidents.pending_action): decided by the
decision service or the fallback, or asked for by an operator, and held there until the
policy gate lets it start (or ops approve it). One type for the three places that build it
(a decision, a manual action, an attempt about to be applied) and the ones that read it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.states import Action

# Who decided: the decision service, our fallback, or an operator (manual action).
SOURCES = ("sira", "fallback", "manual")


@dataclass(frozen=True, slots=True)
class PendingAction:
    action: Action  # PATCH or ROLLBACK: the actions that change an installation
    to_version: str
    from_version: str | None  # the version it was decided for; another one voids it
    automatic: bool  # decided by the loop (False: asked for by an operator)
    requested_by: str  # "worker" or "user:<name>"
    source: str  # one of SOURCES
    confidence: float | None = None
    comment: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "to_version": self.to_version,
            "from_version": self.from_version,
            "automatic": self.automatic,
            "requested_by": self.requested_by,
            "source": self.source,
            "confidence": self.confidence,
            "comment": self.comment,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PendingAction:
        """From the stored JSON. Lenient about what older rows lack (source, comment), as
        the code that wrote them was."""
        confidence = data.get("confidence")
        return cls(
            action=Action.ROLLBACK if data.get("action") == Action.ROLLBACK else Action.PATCH,
            to_version=str(data.get("to_version")),
            from_version=data.get("from_version"),
            automatic=bool(data.get("automatic")),
            requested_by=str(data.get("requested_by") or "worker"),
            source=str(data.get("source") or "manual"),
            confidence=None if confidence is None else float(confidence),
            comment=data.get("comment"),
        )
