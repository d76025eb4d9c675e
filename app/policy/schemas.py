"""The ops policy as the API reads and changes it (GET and PUT /api/ops/policy)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from app.core.models import Severity

# The ids `selfheal plugin register --tenant` accepts.
TenantId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$")]


class Policy(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    autopatch_enabled: bool
    autopatch_whitelist: list[str]
    autopatch_max_severity: Severity
    min_confidence: float
    canary_percent: int
    approvals_required: int
    approval_min_severity: Severity
    approval_ttl_s: int
    max_concurrent_actions: int
    max_concurrent_actions_per_tenant: int
    cooldown_s: int
    updated_at: datetime
    updated_by: str | None


class PolicyUpdate(BaseModel):
    """A partial update: only the fields given change."""

    model_config = ConfigDict(extra="forbid", strict=True)

    autopatch_enabled: bool | None = None
    autopatch_whitelist: Annotated[list[TenantId], Field(max_length=100_000)] | None = None
    autopatch_max_severity: Severity | None = None
    min_confidence: Annotated[float, Field(ge=0, le=1)] | None = None
    canary_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    approvals_required: Annotated[int, Field(ge=1, le=10)] | None = None
    approval_min_severity: Severity | None = None
    approval_ttl_s: Annotated[int, Field(gt=0, le=30 * 86400)] | None = None
    max_concurrent_actions: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    max_concurrent_actions_per_tenant: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    cooldown_s: Annotated[int, Field(ge=0, le=30 * 86400)] | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _no_explicit_null(cls, value: object) -> object:
        # Omitted means "keep"; a JSON null for a column that cannot be NULL is an error.
        # (Validators run only for fields that were sent.)
        if value is None:
            raise PydanticCustomError("null_value", "cannot be null")
        return value
