"""The dashboard's door: /ops/login, /ops/logout, the stylesheet, and `install`, which
app/main.py calls to add every dashboard router and the answers to its refusals. The pages
are in incidents.py, policy.py, attempts.py, fleet.py (with the releases), kpis.py and users.py. None
of it is in the OpenAPI document (it is not the API)."""

from __future__ import annotations

import contextlib
import secrets
from typing import Annotated
from urllib.parse import urlencode

import structlog
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from redis.exceptions import RedisError

from app.dashboard import attempts, fleet, incidents, kpis, policy, sessions, users
from app.dashboard.web import (
    TEMPLATES_DIR,
    Forbidden,
    SignInRequired,
    form_of,
    harden,
    read_form,
    redirect,
    render,
    safe_next,
)
from app.ops.security import user_for_password
from app.services import services, transaction

router = APIRouter(prefix="/ops", include_in_schema=False)
log = structlog.get_logger("selfheal.dashboard")

STYLESHEET = (TEMPLATES_DIR / "style.css").read_bytes()
# Fixed notices the sign-in page shows for a query flag (never text taken from the URL).
NOTICES = {
    "signed-out": "You are signed out.",
    "expired": "Your session has ended; sign in again.",
}


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.include_router(incidents.router)
    app.include_router(policy.router)
    app.include_router(kpis.router)
    app.include_router(attempts.router)
    app.include_router(fleet.router)
    app.include_router(users.router)

    @app.exception_handler(SignInRequired)
    async def _sign_in(_: Request, exc: SignInRequired) -> Response:
        notice = "expired" if exc.expired else None
        return redirect("/ops/login?" + _query(next=exc.next_path, notice=notice))

    @app.exception_handler(Forbidden)
    async def _refused(request: Request, exc: Forbidden) -> Response:
        return await render(request, "error.html", None, {"message": exc.message}, status_code=403)


def _query(**values: str | None) -> str:
    return urlencode({name: value for name, value in values.items() if value is not None})


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/static/style.css")
async def stylesheet() -> Response:
    return Response(
        STYLESHEET, media_type="text/css", headers={"Cache-Control": "public, max-age=3600"}
    )


@router.get("")
@router.get("/")
async def home() -> Response:
    return redirect("/ops/incidents")


async def _login_page(
    request: Request, *, next_path: str, notice: str | None, error: str | None, status_code: int
) -> Response:
    login_csrf = secrets.token_urlsafe(32)
    response = await render(
        request,
        "login.html",
        None,
        {"next": next_path, "notice": notice, "error": error, "login_csrf": login_csrf},
        status_code=status_code,
    )
    response.set_cookie(
        sessions.LOGIN_CSRF_COOKIE,
        login_csrf,
        max_age=3600,
        path="/ops/login",
        httponly=True,
        samesite="lax",
        secure=services(request).settings.secure_cookies,
    )
    return response


@router.get("/login")
async def login_form(
    request: Request,
    next: Annotated[str | None, Query(max_length=2000)] = None,
    notice: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    return await _login_page(
        request,
        next_path=safe_next(next),
        notice=NOTICES.get(notice or ""),
        error=None,
        status_code=200,
    )


@router.post("/login")
async def login(request: Request) -> Response:
    svc = services(request)
    settings = svc.settings
    form = await read_form(request)
    expected = request.cookies.get(sessions.LOGIN_CSRF_COOKIE)
    if not expected or not sessions.same_token(expected, form.get("csrf_token")):
        raise Forbidden("the sign-in form's security token is missing or out of date; reload it")
    username = form.get("username", "").strip()[:64]
    password = form.get("password", "")[:1024]
    next_path = safe_next(form.get("next"))
    throttle = sessions.LoginThrottle(svc.redis, settings)
    address = _address(request)
    try:
        wait_s = await throttle.retry_after_s(username, address)
    except (RedisError, OSError):
        # Fail closed, like the plugin API's replay guard: signed-in sessions (PostgreSQL)
        # and the ops API's tokens keep working; only new sign-ins wait for Redis.
        log.warning("login_throttle_unavailable")
        response = await _login_page(
            request,
            next_path=next_path,
            notice=None,
            error="Sign-in is unavailable: the failed sign-in counter (Redis) cannot be"
            " reached. Retry shortly; the ops API with a token still works.",
            status_code=503,
        )
        response.headers["Retry-After"] = "5"
        return response
    if wait_s is not None:
        response = await _login_page(
            request,
            next_path=next_path,
            notice=None,
            error="Too many failed sign-ins for this account or from this address."
            f" Try again in {max(1, -(-wait_s // 60))} minute(s).",
            status_code=429,
        )
        response.headers["Retry-After"] = str(wait_s)
        return response
    async with transaction(request) as session:
        user = await user_for_password(session, username, password)
        session_id = await sessions.start(session, user, settings) if user else None
        old = request.cookies.get(sessions.COOKIE)
        if user is not None and old:
            # The session the browser came with (if any) ends here: a sign-in never reuses it.
            previous = await sessions.resume(session, old, settings, touch=False)
            if previous is not None:
                await sessions.end(session, previous)
    if user is None or session_id is None:
        with contextlib.suppress(RedisError, OSError):
            await throttle.failed(username, address)
        return await _login_page(
            request,
            next_path=next_path,
            notice=None,
            error="Wrong user name or password.",
            status_code=401,
        )
    with contextlib.suppress(RedisError, OSError):
        await throttle.succeeded(username, address)
    response = redirect(next_path)
    response.set_cookie(
        sessions.COOKIE,
        session_id,
        max_age=settings.session_max_s,
        path="/ops",
        httponly=True,
        samesite="lax",
        secure=settings.secure_cookies,
    )
    response.delete_cookie(sessions.LOGIN_CSRF_COOKIE, path="/ops/login")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    who, _ = await form_of(request)
    async with transaction(request) as session:
        await sessions.end(session, who)
    response = redirect("/ops/login?" + _query(notice="signed-out"))
    response.delete_cookie(
        sessions.COOKIE,
        path="/ops",
        httponly=True,
        samesite="lax",
        secure=services(request).settings.secure_cookies,
    )
    return harden(response)
