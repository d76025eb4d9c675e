"""Deciding what to do about an incident: the decision service client with its deadline,
retries and circuit breaker, and the fallback heuristics used when the service cannot help."""

from app.decisions.breaker import CircuitBreaker
from app.decisions.client import DecisionClient, FeedbackNotDelivered
from app.decisions.fallback import FallbackRules, decide_without_service
from app.decisions.schemas import Decision, Feedback, IncidentFacts, LocalEvidence, OutcomeStats

__all__ = [
    "CircuitBreaker",
    "Decision",
    "DecisionClient",
    "FallbackRules",
    "Feedback",
    "FeedbackNotDelivered",
    "IncidentFacts",
    "LocalEvidence",
    "OutcomeStats",
    "decide_without_service",
]
