"""Errors, two families.

- `DomainError` and its four kinds say what went wrong in the domain's words: `NotFound`,
  `Conflict` (the state forbids it now), `Refused` (the ops policy or a rule about who may act
  says no), `Invalid` (the input is wrong, with the field when there is one). Services and
  repositories raise them; nothing below the routes knows about HTTP.
- `ApiError` is the HTTP answer. Each caller maps a DomainError in one place: the API in
  `install_error_handlers` below (`DOMAIN_STATUS`), the CLI in app/cli/_common.py
  (`reporting_domain_errors`), the worker by recording the message where the step failed.

One JSON error shape everywhere: {"error": {"code", "message", "field"?}}."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return orjson.dumps({"error": error})


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return Response(
        error_body(code, message, field),
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
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

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
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

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
