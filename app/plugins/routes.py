"""The plugin-facing API (docs/contracts.md, "Plugin API"). Handlers read the raw body themselves:
the signature covers the exact bytes, and the size cap must hold before parsing."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
import structlog
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from redis.exceptions import RedisError
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from app.core.errors import (
    ApiError,
    DomainError,
    error_body,
    error_responses,
    validation_error,
)
from app.core.metrics import (
    HEARTBEATS_ACCEPTED,
    HEARTBEATS_ALREADY_STORED,
    HEARTBEATS_REJECTED,
)
from app.core.pgjson import UnstorableValue, json_for_postgres
from app.core.ratelimit import limit_plugin_request
from app.core.settings import Settings
from app.incidents.rules import looks_unhealthy, thresholds
from app.plugins import service
from app.plugins.auth import AuthFailed, VerifiedRequest
from app.plugins.ingest import IngestRejected, IngestUnavailable, InstallationGone
from app.plugins.schemas import (
    CommandAck,
    CommandAcked,
    CommandFail,
    CommandFailed,
    Heartbeat,
    HeartbeatAnswer,
)
from app.releases import repository as releases
from app.releases.artifacts import ArtifactCapabilities
from app.services import Services, services, transaction

# The answers are raw signed bytes; `responses=` describes them to the OpenAPI document. Error
# answers are not signed (docs/contracts.md, "Plugin API").
_SIGNED = "Signed: X-Timestamp and X-Signature cover the status, the path and these exact bytes"
router = APIRouter(
    prefix="/api/plugins",
    tags=["plugins"],
    responses=error_responses(
        401,
        429,
        503,
        descriptions={
            401: "Missing or bad signature headers, an unknown or disabled installation, a stale"
            " timestamp, or a request already received (`code` says which)"
        },
    ),
)
# What a signed request with a body can meet before it is handled.
_BODY_ERRORS = error_responses(
    400,
    413,
    422,
    descriptions={400: "The client went away while sending the body"},
)

_RETRY_LATER = {"Retry-After": "5"}
_REPLAY = "this signed request was already received"

# The plugin routes read their raw body (the signature covers those exact bytes), so FastAPI
# never parses it and cannot describe it: the OpenAPI document gets each body's model from
# here (`document_raw_bodies`, called by SelfhealAPI.openapi). (model, required)
RAW_BODIES: dict[tuple[str, str], tuple[type[BaseModel], bool]] = {
    ("/api/plugins/heartbeat", "post"): (Heartbeat, True),
    ("/api/plugins/commands/{command_id}/ack", "post"): (CommandAck, False),
    ("/api/plugins/commands/{command_id}/fail", "post"): (CommandFail, True),
}


def document_raw_bodies(document: dict[str, Any]) -> None:
    """Add the request bodies of RAW_BODIES, and the schemas they refer to, to `document`."""
    models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (model, "validation") for model, _ in RAW_BODIES.values()
    ]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    for (path, method), (model, required) in RAW_BODIES.items():
        operation = document["paths"][path][method]
        operation["requestBody"] = {
            "required": required,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }


def _signed_json(verified: VerifiedRequest, request: Request, data: dict[str, Any]) -> Response:
    body = orjson.dumps(data)
    return Response(
        body,
        media_type="application/json",
        headers=verified.response_headers(200, request.url.path, body),
    )


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
    # Before any database work of the request (the credentials come from the process's
    # cache): one Redis round trip counts it per installation and per tenant, or 429.
    await limit_plugin_request(
        svc.limiter, svc.settings, str(verified.installation_id), verified.tenant_id
    )
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
        raise AuthFailed("replay", _REPLAY)
    try:
        yield
    except (ApiError, DomainError):
        raise  # a definite answer (404, 409): the request was dealt with
    except BaseException:
        with contextlib.suppress(RedisError, OSError):
            await svc.redis.delete(key)
        raise


def next_heartbeat_s(settings: Settings, heartbeat: Heartbeat, urgent: bool) -> int:
    """docs/contracts.md, adaptive next_heartbeat_s: the configured interval, or
    SELFHEAL_HEARTBEAT_FAST_S while the installation has an open incident, a command waiting or
    a change being verified (`urgent`, read by the ingest statement), and for a heartbeat that itself crosses a
    threshold: detection will open an incident on it within a tick, and the plugin should not
    wait a whole interval to hear what to do."""
    fast = min(settings.heartbeat_fast_s, settings.heartbeat_interval_s)
    if urgent:
        return fast
    t = heartbeat.telemetry
    if looks_unhealthy(
        thresholds(settings),
        requests=t.requests,
        errors=t.errors,
        webhook_attempts=t.webhook_attempts,
        webhook_failures=t.webhook_failures,
    ):
        return fast
    return settings.heartbeat_interval_s


@dataclass(frozen=True, slots=True)
class SignedAnswer:
    body: bytes
    headers: dict[str, str]


async def accept_heartbeat(
    svc: Services, headers: Mapping[str, str], method: str, path: str, receive: Receive
) -> SignedAnswer:
    """Authenticate, validate and store one heartbeat; the signed JSON answer, or ApiError.
    Shared by the route below and the ASGI fast path (app/plugins/fastpath.py) that serves it."""
    try:
        body = await read_body(receive, headers, svc.settings.max_body_bytes)
        verified = await authenticate(svc, headers, method, path, body)
        try:
            hb = Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        try:
            result = await svc.batcher.submit(
                verified.installation_id, verified.digest, hb, verified.signed_at
            )
        except IngestUnavailable as exc:
            raise ApiError(503, "unavailable", f"{exc}; retry later", headers=_RETRY_LATER) from exc
        except IngestRejected as exc:
            raise ApiError(422, "validation_error", str(exc), field=exc.field) from None
        except InstallationGone:
            raise AuthFailed("unknown_plugin", "X-Plugin-Id is not a known installation") from None
    except ApiError as exc:
        HEARTBEATS_REJECTED.labels(exc.code).inc()
        raise
    if not result.accepted:
        # Mostly plugin_client sending again a heartbeat whose answer it lost: counted apart
        # from the refusals, which an alert on replays (an attack, a broken proxy) watches.
        HEARTBEATS_ALREADY_STORED.inc()
        raise signed_replay(verified, path)
    HEARTBEATS_ACCEPTED.inc()
    body = orjson.dumps(
        {
            "server_time": datetime.now(UTC),
            "next_heartbeat_s": next_heartbeat_s(svc.settings, hb, result.urgent),
            "commands": result.commands,
        }
    )
    return SignedAnswer(body, verified.response_headers(200, path, body))


def signed_replay(verified: VerifiedRequest, path: str) -> AuthFailed:
    """The 401 `replay` answer to a heartbeat already stored, signed like a 200 (unlike other
    error answers) and naming the stored message's digest: a plugin that got no answer to a
    heartbeat sends the same bytes again, and this answer tells it, verifiably and about that
    request only, that the first copy was stored (docs/contracts.md)."""
    digest = verified.digest.hex()
    body = error_body("replay", _REPLAY, request=digest)
    return AuthFailed(
        "replay", _REPLAY, headers=verified.response_headers(401, path, body), request=digest
    )


@router.post(
    "/heartbeat",
    responses={200: {"model": HeartbeatAnswer, "description": _SIGNED}, **_BODY_ERRORS},
)
async def heartbeat(request: Request) -> Response:
    """Documents the route; requests are served by HeartbeatFastPath with the same code."""
    answer = await accept_heartbeat(
        services(request), request.headers, request.method, request.url.path, request.receive
    )
    return Response(answer.body, media_type="application/json", headers=answer.headers)


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


@router.post(
    "/commands/{command_id}/ack",
    responses={
        200: {"model": CommandAcked, "description": _SIGNED},
        **_BODY_ERRORS,
        **error_responses(404, 409),
    },
)
async def ack(command_id: str, request: Request) -> Response:
    svc, verified, payload = await signed_command_request(request, CommandAck)
    result_json = _storable(lambda: json_for_postgres("result", payload.result))
    async with once_only(svc, verified), transaction(request) as session:
        state = await service.acknowledge(
            session, verified.installation_id, command_id, result_json
        )
    return _signed_json(verified, request, state)


@router.post(
    "/commands/{command_id}/fail",
    responses={
        200: {"model": CommandFailed, "description": _SIGNED},
        **_BODY_ERRORS,
        **error_responses(404, 409),
    },
)
async def fail(command_id: str, request: Request) -> Response:
    svc, verified, payload = await signed_command_request(request, CommandFail)
    _storable(lambda: json_for_postgres("error", payload.error))
    async with once_only(svc, verified), transaction(request) as session:
        state = await service.report_failure(
            session, verified.installation_id, command_id, payload.error, payload.retryable
        )
    return _signed_json(verified, request, state)


ARTIFACT_CHUNK_BYTES = 1024 * 1024


@functools.cache
def _capabilities(secret_key: str, previous: tuple[str, ...]) -> ArtifactCapabilities:
    """One key derivation per process, not one per download."""
    return ArtifactCapabilities(secret_key, previous)


# 422: see error_responses (a route with parameters declares it).
@router.get(
    "/releases/{plugin}/{version}/artifact",
    response_model=None,
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The release's stored bytes (not HMAC-signed: check them against"
            " the sha256 of the signed release statement)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "headers": {
                "X-Artifact-Sha256": {
                    "description": "The stored bytes' sha256 (hex)",
                    "schema": {"type": "string"},
                }
            },
        },
        **error_responses(
            403,
            404,
            422,
            descriptions={
                403: "The capability URL (expires, token) is not valid or has expired",
                404: "No stored artifact for this release, or another plugin's release",
            },
        ),
    },
)
async def artifact(plugin: str, version: str, request: Request) -> Response:
    """The stored bytes of a release, for a signed request of an installation of that plugin,
    or for the capability URL the worker hands the staging runner (app/releases/artifacts.py).
    The response is not HMAC-signed: the client checks the bytes against the sha256 of the
    Ed25519-signed release statement before it uses them, which is a stronger check."""
    svc = services(request)
    expires, token = request.query_params.get("expires"), request.query_params.get("token")
    if expires is not None or token is not None:
        capabilities = _capabilities(svc.settings.secret_key, svc.settings.previous_secret_keys)
        if not capabilities.allows(plugin, version, expires=expires or "", token=token or ""):
            raise ApiError(403, "forbidden", "this artifact URL is not valid or has expired")
    else:
        verified = await authenticate(svc, request.headers, request.method, request.url.path, b"")
        if verified.plugin_name != plugin:
            # Another plugin's release: as if it did not exist.
            raise ApiError(404, "not_found", "no stored artifact for this release")
    async with svc.sessionmaker() as session:
        stored = await releases.stored_artifact(session, plugin, version)
    if stored is None:
        raise ApiError(404, "not_found", "no stored artifact for this release")

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, stored.size_bytes, ARTIFACT_CHUNK_BYTES):
            async with svc.sessionmaker() as session:
                yield await releases.artifact_chunk(
                    session, plugin, version, offset=offset, size=ARTIFACT_CHUNK_BYTES
                )

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(stored.size_bytes),
            "X-Artifact-Sha256": stored.sha256,
            "Cache-Control": "no-store",
        },
    )
