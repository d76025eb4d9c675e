"""The ops policy gate that every production-changing step passes (see gate.py)."""

from app.policy.gate import (
    ApprovalRefused,
    GateResult,
    ProposedAction,
    action_key,
    canary_bucket,
    evaluate,
    record_approval,
    tenant_in_canary,
)

__all__ = [
    "ApprovalRefused",
    "GateResult",
    "ProposedAction",
    "action_key",
    "canary_bucket",
    "evaluate",
    "record_approval",
    "tenant_in_canary",
]
