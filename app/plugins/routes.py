"""The plugin-facing API (DESIGN.md, "Plugin API"). Handlers read the raw body themselves:
the signature covers the exact bytes, and the size cap must hold before parsing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import structlog
from fastapi import APIRouter, Request
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.responses import Response

from app.core.errors import ApiError, validation_error
from app.core.metrics import HEARTBEATS_ACCEPTED, HEARTBEATS_REJECTED
from app.core.pgjson import UnstorableValue, json_for_postgres
from app.core.state import Services, services
from app.plugins import service
from app.plugins.auth import AuthFailed, VerifiedRequest
from app.plugins.ingest import IngestRejected, IngestUnavailable
from app.plugins.schemas import CommandAck, CommandFail, Heartbeat

router = APIRouter(prefix="/api/plugins", tags=["plugins"])

_RETRY_LATER = {"Retry-After": "5"}


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "payload_too_large", f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def authenticate(request: Request, svc: Services, body: bytes) -> VerifiedRequest:
    headers = request.headers
    verified = await svc.authenticator.verify(
        plugin_id=headers.get("x-plugin-id"),
        timestamp=headers.get("x-timestamp"),
        signature=headers.get("x-signature"),
        method=request.method,
        path=request.url.path,
        body=body,
    )
    structlog.contextvars.bind_contextvars(plugin_id=str(verified.installation_id))
    return verified


async def refuse_replay(svc: Services, verified: VerifiedRequest) -> None:
    """Replay guard for the low-volume plugin requests (heartbeats use the database's unique
    index instead, inside their batch). Shared by every API process through Redis."""
    key = f"{svc.settings.redis_prefix}replay:{verified.installation_id}:{verified.digest.hex()}"
    try:
        first = await svc.redis.set(
            key, b"1", nx=True, ex=2 * svc.settings.signature_tolerance_s + 5
        )
    except (RedisError, OSError) as exc:
        raise ApiError(
            503,
            "unavailable",
            "replay cache (Redis) unavailable; retry later",
            headers=_RETRY_LATER,
        ) from exc
    if not first:
        raise AuthFailed("replay", "this signed request was already received")


@router.post("/heartbeat")
async def heartbeat(request: Request) -> Response:
    svc = services(request)
    try:
        body = await read_body(request, svc.settings.max_body_bytes)
        verified = await authenticate(request, svc, body)
        try:
            hb = Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        try:
            result = await svc.batcher.submit(verified.installation_id, verified.digest, hb)
        except IngestUnavailable as exc:
            raise ApiError(503, "unavailable", f"{exc}; retry later", headers=_RETRY_LATER) from exc
        except IngestRejected as exc:
            raise ApiError(422, "validation_error", str(exc), field=exc.field) from None
        if not result.accepted:
            raise AuthFailed("replay", "this signed request was already received")
    except ApiError as exc:
        HEARTBEATS_REJECTED.labels(exc.code).inc()
        raise
    HEARTBEATS_ACCEPTED.inc()
    return _json(
        200,
        {
            "server_time": datetime.now(UTC).isoformat(),
            "next_heartbeat_s": svc.settings.heartbeat_interval_s,
            "commands": result.commands,
        },
    )


@router.post("/commands/{command_id}/ack")
async def ack(command_id: str, request: Request) -> Response:
    svc = services(request)
    body = await read_body(request, svc.settings.max_body_bytes)
    verified = await authenticate(request, svc, body)
    payload = _parse(CommandAck, body)
    result_json = _storable(lambda: json_for_postgres("result", payload.result))
    await refuse_replay(svc, verified)
    async with svc.sessionmaker() as session, session.begin():
        state = await service.acknowledge(
            session, verified.installation_id, command_id, result_json
        )
    return _json(200, state)


@router.post("/commands/{command_id}/fail")
async def fail(command_id: str, request: Request) -> Response:
    svc = services(request)
    body = await read_body(request, svc.settings.max_body_bytes)
    verified = await authenticate(request, svc, body)
    payload = _parse(CommandFail, body)
    _storable(lambda: json_for_postgres("error", payload.error))
    await refuse_replay(svc, verified)
    async with svc.sessionmaker() as session, session.begin():
        state = await service.report_failure(
            session, verified.installation_id, command_id, payload.error, payload.retryable
        )
    return _json(200, state)


_Body = TypeVar("_Body", CommandAck, CommandFail)


def _storable(encode: Callable[[], str]) -> str:
    """Checked before the replay key is spent, so a refused request can be corrected and sent."""
    try:
        return encode()
    except UnstorableValue as exc:
        raise ApiError(422, "validation_error", str(exc), field=exc.field) from None


def _parse(model: type[_Body], body: bytes) -> _Body:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise validation_error(exc) from None
