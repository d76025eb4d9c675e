"""What plugins send, and what the plugin API answers (docs/contracts.md, "Plugin API").

What plugins send is strict: JSON types must match (no "12" for 12, no true for 1), unknown
fields are refused, counters cannot be negative and rates stay within 0..1. The answers are
built as raw signed bytes in app/plugins/routes.py (the signature covers the exact body); the
models below describe them to the OpenAPI document."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.core import names
from app.core.models import COMMAND_TYPES

# Counters are bigint in the database; anything above 2**53 cannot come from a real plugin.
Counter = Annotated[int, Field(ge=0, le=2**53)]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]
# 1.2.3, 1.2.3-rc.1, 2.0.0+build.5, 10.4: digits first, then a conservative charset.
Version = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=names.VERSION_PATTERN),
]
EnvName = Annotated[str, Field(min_length=1, max_length=32, pattern=names.ENV_PATTERN)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Telemetry(StrictModel):
    requests: Counter = 0
    errors: Counter = 0
    webhook_attempts: Counter = 0
    webhook_failures: Counter = 0
    latency_p95_ms: Annotated[float, Field(ge=0, le=3_600_000)] | None = None
    errors_last_24h: Counter | None = None
    error_rate: Rate | None = None
    webhook_fail_rate: Rate | None = None

    @field_validator("webhook_failures")
    @classmethod
    def _failures_within_attempts(cls, value: int, info: ValidationInfo) -> int:
        attempts = info.data.get("webhook_attempts")
        if isinstance(attempts, int) and value > attempts:
            raise ValueError("webhook_failures cannot exceed webhook_attempts")
        return value


class Heartbeat(StrictModel):
    plugin_version: Version
    env: EnvName = "prod"
    uptime_s: Annotated[int, Field(ge=0, le=10 * 365 * 86400)] | None = None
    sent_at: AwareDatetime | None = None
    telemetry: Telemetry = Telemetry()
    meta: dict[str, Any] = Field(default_factory=dict)


class CommandAck(StrictModel):
    result: dict[str, Any] = Field(default_factory=dict)


class CommandFail(StrictModel):
    error: Annotated[str, Field(min_length=1, max_length=4000)]
    retryable: bool = False


# --- Answers --------------------------------------------------------------------------------

CommandType = Literal["update", "rollback", "config"]
assert set(CommandType.__args__) == set(COMMAND_TYPES)  # type: ignore[attr-defined]


class Command(BaseModel):
    """A command handed to the plugin with a heartbeat (app/plugins/ingest.py)."""

    id: uuid.UUID = Field(description="Ack or fail it at /api/plugins/commands/{id}/ack|fail")
    type: CommandType
    payload: dict[str, Any] = Field(
        description=(
            "update: version, artifact_url, sha256, signature, signed (the Ed25519-signed"
            " statement); rollback: version, plus the update fields when a signed release of"
            " that version exists; config: the values to apply"
        )
    )
    expires_at: datetime = Field(description="After this the command is no longer carried out")


class HeartbeatAnswer(BaseModel):
    """The signed answer to an accepted heartbeat."""

    server_time: datetime
    next_heartbeat_s: int = Field(
        description="Seconds until the next heartbeat: shorter while something is under way"
    )
    commands: list[Command] = Field(description="Oldest first; often empty")


class CommandAcked(BaseModel):
    """The signed answer to an ack (the same for an ack sent again)."""

    id: uuid.UUID
    status: Literal["acked"]


class CommandFailed(BaseModel):
    """The signed answer to a fail (the same for a fail sent again). `pending`: the failure
    was retryable and the command has deliveries left; a later heartbeat hands it out again."""

    id: uuid.UUID
    status: Literal["failed", "pending"]
