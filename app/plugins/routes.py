"""The plugin-facing API (DESIGN.md, "Plugin API"). Handlers read the raw body themselves:
the signature covers the exact bytes, and the size cap must hold before parsing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import structlog
from fastapi import APIRouter, Request
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive

from app.core.errors import ApiError, validation_error
from app.core.metrics import HEARTBEATS_ACCEPTED, HEARTBEATS_REJECTED
from app.core.pgjson import UnstorableValue, json_for_postgres
from app.core.state import Services, services
from app.plugins import service
from app.plugins.auth import AuthFailed, VerifiedRequest
from app.plugins.ingest import IngestRejected, IngestUnavailable, InstallationGone
from app.plugins.schemas import CommandAck, CommandFail, Heartbeat

router = APIRouter(prefix="/api/plugins", tags=["plugins"])

_RETRY_LATER = {"Retry-After": "5"}


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `limit` (from
    Content-Length, or while streaming) so a huge body is never held in memory."""
    declared = headers.get("content-length")
    too_large = ApiError(413, "payload_too_large", f"request body is larger than {limit} bytes")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "bad_request", "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def authenticate(
    svc: Services, headers: Mapping[str, str], method: str, path: str, body: bytes
) -> VerifiedRequest:
    verified = await svc.authenticator.verify(
        plugin_id=headers.get("x-plugin-id"),
        timestamp=headers.get("x-timestamp"),
        signature=headers.get("x-signature"),
        method=method,
        path=path,
        body=body,
    )
    structlog.contextvars.bind_contextvars(plugin_id=str(verified.installation_id))
    return verified


@contextlib.asynccontextmanager
async def once_only(svc: Services, verified: VerifiedRequest) -> AsyncIterator[None]:
    """Replay guard for the low-volume plugin requests (heartbeats use the database's unique
    index instead, inside their batch), shared by every API process through Redis. If the work
    inside fails (say the database is down and the plugin gets a 503), the request was not
    carried out and the same signed request may be sent again: the key is released."""
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
    try:
        yield
    except ApiError:
        raise  # a definite answer (404, 409): the request was dealt with
    except BaseException:
        with contextlib.suppress(RedisError, OSError):
            await svc.redis.delete(key)
        raise


async def accept_heartbeat(
    svc: Services, headers: Mapping[str, str], method: str, path: str, receive: Receive
) -> bytes:
    """Authenticate, validate and store one heartbeat; the JSON answer, or ApiError. Shared
    by the route below and the ASGI fast path (app/plugins/fastpath.py) that serves it."""
    try:
        body = await read_body(receive, headers, svc.settings.max_body_bytes)
        verified = await authenticate(svc, headers, method, path, body)
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
        except InstallationGone:
            raise AuthFailed("unknown_plugin", "X-Plugin-Id is not a known installation") from None
        if not result.accepted:
            raise AuthFailed("replay", "this signed request was already received")
    except ApiError as exc:
        HEARTBEATS_REJECTED.labels(exc.code).inc()
        raise
    HEARTBEATS_ACCEPTED.inc()
    return orjson.dumps(
        {
            "server_time": datetime.now(UTC),
            "next_heartbeat_s": svc.settings.heartbeat_interval_s,
            "commands": result.commands,
        }
    )


@router.post("/heartbeat")
async def heartbeat(request: Request) -> Response:
    """Documents the route; requests are served by HeartbeatFastPath with the same code."""
    answer = await accept_heartbeat(
        services(request), request.headers, request.method, request.url.path, request.receive
    )
    return Response(answer, media_type="application/json")


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


async def signed_command_request(
    request: Request, model: type[_Body]
) -> tuple[Services, VerifiedRequest, _Body]:
    """Body, signature and payload of an ack or fail (the replay check comes after the caller
    has checked the payload can be stored)."""
    svc = services(request)
    body = await read_body(request.receive, request.headers, svc.settings.max_body_bytes)
    verified = await authenticate(svc, request.headers, request.method, request.url.path, body)
    return svc, verified, _parse(model, body)


@router.post("/commands/{command_id}/ack")
async def ack(command_id: str, request: Request) -> Response:
    svc, verified, payload = await signed_command_request(request, CommandAck)
    result_json = _storable(lambda: json_for_postgres("result", payload.result))
    async with once_only(svc, verified), svc.sessionmaker() as session, session.begin():
        state = await service.acknowledge(
            session, verified.installation_id, command_id, result_json
        )
    return _json(200, state)


@router.post("/commands/{command_id}/fail")
async def fail(command_id: str, request: Request) -> Response:
    svc, verified, payload = await signed_command_request(request, CommandFail)
    _storable(lambda: json_for_postgres("error", payload.error))
    async with once_only(svc, verified), svc.sessionmaker() as session, session.begin():
        state = await service.report_failure(
            session, verified.installation_id, command_id, payload.error, payload.retryable
        )
    return _json(200, state)
