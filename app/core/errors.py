"""Errors, two families.

- `DomainError` and its four kinds say what went wrong in the domain's words: `NotFound`,
  `Conflict` (the state forbids it now), `Refused` (the ops policy or a rule about who may act
  says no), `Invalid` (the input is wrong, with the field when there is one). Services and
  repositories raise them; nothing below the routes knows about HTTP.
- `ApiError` is the HTTP answer. Each caller maps a DomainError in one place: the API in
  `install_error_handlers` below (`DOMAIN_STATUS`), the CLI in app/cli/_common.py
  (`reporting_domain_errors`), the worker by recording the message where the step failed.

One JSON error shape everywhere: {"error": {"code", "message", "field"?}}. `ErrorBody` describes
it to the OpenAPI document, and `error_responses` declares it for the statuses a router or a
route can answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = structlog.get_logger("selfheal.errors")


class DomainError(Exception):
    """A failure the caller can act on; `message` is written for the person who acts."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class NotFound(DomainError, LookupError):
    """The thing named does not exist (or is not the caller's to see)."""


class Conflict(DomainError):
    """The thing exists but its state forbids this now (an incident already resolved, a
    command already acknowledged, a name already taken)."""


class Refused(DomainError):
    """The ops policy or a rule about who may act says no (an approval by the requester)."""


class Invalid(DomainError, ValueError):
    """The input is wrong; `field` names it when it is one field."""


# How the API answers each kind: (HTTP status, error code).
DOMAIN_STATUS: dict[type[DomainError], tuple[int, str]] = {
    NotFound: (404, "not_found"),
    Conflict: (409, "conflict"),
    Refused: (403, "forbidden"),
    Invalid: (422, "validation_error"),
}


def domain_status(exc: DomainError) -> tuple[int, str]:
    for kind in type(exc).__mro__:
        if kind in DOMAIN_STATUS:
            return DOMAIN_STATUS[kind]
    return 400, "bad_request"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        request: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers
        self.request = request


class ErrorDetail(BaseModel):
    code: str = Field(description="What went wrong, for programs: not_found, conflict, ...")
    message: str = Field(description="What went wrong, for the person who acts on it")
    # Absent, never null, when the error is not about one field.
    field: str | SkipJsonSchema[None] = Field(
        None, description="The input field at fault (dotted path), when it is one field"
    )
    request: str | SkipJsonSchema[None] = Field(
        None,
        description="A heartbeat's `replay` answer only: the hex SHA-256 of the signed message"
        " ('{timestamp}.POST.{path}.{raw body}') already stored, so that the signed answer"
        " speaks of this request and no other",
    )


class ErrorBody(BaseModel):
    """Every error answer of the API (`error_body`)."""

    error: ErrorDetail


# What each status means across the API; a router may say more for its own callers.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The request could not be read (the client went away while sending it)",
    401: "Missing, invalid or revoked credentials",
    403: "Refused: the caller's role, the ops policy or a rule about who may act says no",
    404: "The thing named does not exist (or is not the caller's to see)",
    409: "The thing exists, but its state forbids this now",
    413: "The request body is larger than the server accepts",
    415: "The request body's media type is not accepted",
    422: "The input is invalid; `field` names it when it is one field",
    429: "Over a rate limit (the message names it: this installation, its tenant, this"
    " token); retry after Retry-After seconds",
    503: "A dependency (PostgreSQL, Redis) is unavailable; retry after Retry-After seconds",
}

_RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer"},
    }
}


def error_responses(
    *statuses: int, descriptions: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries: each status answers with ErrorBody.

    Declaring 422 replaces FastAPI's own 422 schema (HTTPValidationError), which is not what
    this API sends. FastAPI adds that schema to every route with parameters or a body, so such
    a route declares 422 even when none of its input can be invalid (a path id that names
    nothing is a 404)."""
    described = {**ERROR_DESCRIPTIONS, **(descriptions or {})}
    entries: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": described[status]}
        if status in (429, 503):
            entry["headers"] = _RETRY_AFTER_HEADER
        entries[status] = entry
    return entries


def error_body(
    code: str, message: str, field: str | None = None, request: str | None = None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    if request is not None:
        error["request"] = request
    return orjson.dumps({"error": error})


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    request: str | None = None,
) -> Response:
    return Response(
        error_body(code, message, field, request),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """('body', 'telemetry', 'errors') -> 'telemetry.errors'; list indexes kept as [i]."""
    parts: list[str] = []
    for item in loc:
        if item in ("body", "query", "path", "header") and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    field = field_path(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return ApiError(422, "invalid_json", "request body is not valid JSON")
    if (
        first.get("type") == "model_attributes_type"
        and tuple(first.get("loc", ())) == ("body",)
        and isinstance(first.get("input"), str | bytes)
    ):
        # A JSON body sent as another media type (curl -d sends a form's): FastAPI hands the
        # raw text on instead of parsing it.
        return ApiError(
            422,
            "validation_error",
            "body: send a JSON object with Content-Type: application/json",
            field="body",
        )
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    more = (
        f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        if len(errors) > 1
        else ""
    )
    return ApiError(422, "validation_error", f"{field or 'body'}: {message}{more}", field=field)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        structlog.contextvars.bind_contextvars(error=exc.code)
        return error_response(
            exc.status, exc.code, exc.message, exc.field, exc.headers, exc.request
        )

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> Response:
        status, code = domain_status(exc)
        structlog.contextvars.bind_contextvars(error=code)
        return error_response(status, code, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> Response:
        err = validation_error(exc)
        return error_response(err.status, err.code, err.message, err.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI answers a JSON body that is not UTF-8 with a bare 400 ("error parsing
            # the body"); it is invalid JSON like any other, and answered as such (found by
            # schemathesis, tests/test_fuzz_api.py).
            return error_response(422, "invalid_json", "request body is not valid JSON")
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(sa_exc.DataError)
    async def _unstorable_value(_: Request, exc: sa_exc.DataError) -> Response:
        # SQLSTATE class 22: a value the request carried that PostgreSQL cannot hold or
        # compare (a NUL character in a text filter, a number out of range). The request is at
        # fault, not the server (found by schemathesis, tests/test_fuzz_api.py).
        log.info("request_value_refused_by_database", error=str(exc.orig)[:200])
        return error_response(
            422,
            "validation_error",
            "a value in the request cannot be stored or compared"
            " (a NUL character, or a number out of range)",
        )

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    @app.exception_handler(sa_exc.TimeoutError)
    async def _database_down(_: Request, exc: Exception) -> Response:
        log.warning("database_unavailable", error=str(exc)[:300])
        return error_response(
            503, "unavailable", "database unavailable; retry later", headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", error=type(exc).__name__)
        return error_response(500, "internal_error", "internal error; see the server log")
