"""What every dashboard page shares: the templates, the signed-in check (session, role, CSRF),
form bodies, and the answers (a page, a 303 redirect, a refusal) with their security headers.

A page asks `signed_in(request, role)`; a form handler asks `form_of(request, role)`, which
also checks the CSRF token. Both raise `SignInRequired` (answered with a redirect to the
sign-in page) or `Forbidden` (a 403 page); `install` in routes.py answers them."""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import DomainError, validation_error
from app.dashboard import sessions
from app.policy import service as policy_service
from app.services import services, transaction

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


templates.env.filters["utc"] = _utc

# What every dashboard answer carries: no caching of pages that show incidents, no framing
# (a kill switch must not be clickjacked), no scripts at all, forms posted only here.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class SignInRequired(Exception):
    def __init__(self, next_path: str, *, expired: bool) -> None:
        super().__init__("sign in first")
        self.next_path = next_path
        self.expired = expired  # the browser had a session cookie: it no longer counts


class Forbidden(Exception):
    """A 403 page: the role is too low, or the form's CSRF token is missing or wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def harden(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def redirect(url: str) -> Response:
    return harden(RedirectResponse(url, status_code=303))


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a dashboard path only (no open redirect)."""
    if path and path.startswith("/ops/") and not path.startswith("//") and "\\" not in path:
        return path
    return "/ops/incidents"


async def signed_in(request: Request, role: str = "viewer") -> sessions.SignedIn:
    """The signed-in user of this request, of at least `role`. A page's own automatic refresh
    (`?refresh=1`) does not count as activity for the idle timeout."""
    touch = request.query_params.get("refresh") != "1"
    cookie = request.cookies.get(sessions.COOKIE)
    async with transaction(request) as session:
        found = await sessions.resume(session, cookie, services(request).settings, touch=touch)
    if found is None:
        # Back to this page after signing in; a form's POST cannot be replayed by a redirect.
        next_path = request.url.path if request.method == "GET" else "/ops/incidents"
        if request.method == "GET" and request.url.query:
            next_path += "?" + request.url.query
        raise SignInRequired(next_path, expired=bool(cookie))
    if not found.user.can(role):
        raise Forbidden(f"this needs the {role} role; you are {found.user.role}")
    return found


async def read_form(request: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body (the dashboard's forms), first value of each
    field; anything else reads as an empty form (and so fails the CSRF check)."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {}
    # The body-limit middleware (app/core/bodylimit.py) has refused larger ones with 413.
    limit = services(request).settings.form_max_body_bytes
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise Forbidden("the form is larger than the dashboard accepts")
    try:
        fields = urllib.parse.parse_qs(
            body.decode(), keep_blank_values=True, strict_parsing=False, max_num_fields=200
        )
    except (UnicodeDecodeError, ValueError):
        return {}
    return {name: values[0] for name, values in fields.items()}


async def form_of(
    request: Request, role: str = "viewer"
) -> tuple[sessions.SignedIn, dict[str, str]]:
    """A dashboard form's sender and fields: signed in, the CSRF token right (else 403, before
    any role check says more), then at least `role`."""
    found = await signed_in(request, "viewer")
    form = await read_form(request)
    if not sessions.same_token(found.csrf_token, form.get("csrf_token")):
        raise Forbidden("the form's security token is missing or out of date; reload the page")
    if not found.user.can(role):
        raise Forbidden(f"this needs the {role} role; you are {found.user.role}")
    return found, form


async def act(
    request: Request,
    who: sessions.SignedIn,
    back: str,
    work: Callable[[AsyncSession], Awaitable[str]],
    *,
    failed: str = "Not done",
) -> Response:
    """Run a form's work in one transaction, then 303 back to `back` with what happened: the
    work's own message, or why it was not done. The one place the dashboard maps a
    DomainError (and a field pydantic refused) to what the user reads."""
    try:
        async with transaction(request) as session:
            message = await work(session)
    except DomainError as exc:
        message = f"{failed}: {exc.message}"
    except ValidationError as exc:
        message = f"{failed}: {validation_error(exc).message}"
    await say(request, who, message)
    return redirect(back)


async def say(request: Request, who: sessions.SignedIn, message: str) -> None:
    """A message for the next page this session shows."""
    async with transaction(request) as session:
        await sessions.flash(session, who, message)


async def render(
    request: Request,
    name: str,
    who: sessions.SignedIn | None,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
) -> Response:
    """A page from templates/, with what base.html shows: the user, the CSRF token for its
    forms, the flash message, and whether the kill switch is on (autopatch off)."""
    autopatch_enabled = None
    if who is not None:
        async with transaction(request) as session:
            autopatch_enabled = (await policy_service.read_policy(session)).autopatch_enabled
    response = templates.TemplateResponse(
        request,
        name,
        {
            "who": who,
            "user": who.user if who else None,
            "csrf_token": who.csrf_token if who else None,
            "flash": who.flash if who else None,
            "autopatch_enabled": autopatch_enabled,
            **(context or {}),
        },
        status_code=status_code,
    )
    return harden(response)


def choice(value: str | None, allowed: tuple[str, ...]) -> str | None:
    """A filter's value when it is one of `allowed` (anything else: no filter)."""
    return value if value in allowed else None


def text_field(value: str | None, limit: int) -> str | None:
    """A free-text query or form value, trimmed and cut at `limit`; None when empty."""
    value = (value or "").strip()
    return value[:limit] if value else None
