"""Maintenance windows as the ops API takes and gives them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MIN_DURATION_S = 60
MAX_DURATION_S = 30 * 86400


class WindowCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: Annotated[str, Field(strict=True, min_length=1, max_length=200)] | None = None
    installation_id: uuid.UUID | None = None
    starts_at: AwareDatetime | None = None
    ends_at: AwareDatetime | None = None
    duration_s: Annotated[int, Field(strict=True, ge=MIN_DURATION_S, le=MAX_DURATION_S)] | None = (
        None
    )
    reason: Annotated[str, Field(strict=True, min_length=1, max_length=500)]

    @field_validator("reason")
    @classmethod
    def _reason_says_something(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("blank", "must not be blank")
        return value.strip()


class Window(BaseModel):
    id: uuid.UUID
    tenant_id: str | None
    installation_id: uuid.UUID | None
    starts_at: datetime
    ends_at: datetime
    reason: str
    created_by: str
    created_at: datetime
    active: bool


class WindowList(BaseModel):
    items: list[Window]
