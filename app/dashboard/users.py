"""The admin's user management page (/ops/users): the ops users with their role, when they were
created, whether they are disabled and when their API token was last used (never a password
hash, token or token hash) and the tenants they are limited to; forms to add a user, change a
role, set a viewer's or operator's tenants, disable and enable a user, through
app/ops/security.py as `selfheal user add` does.

Adding a user shows the generated password and API token once: the POST answers with the page
itself (no-store, like every dashboard page) rather than a redirect, so neither ever sits in a
URL, the server-side flash message, a log line or the history a reload reaches; reloading
that answer re-posts the form, which is refused (the name is taken). Disabling a user also
ends their dashboard sessions and revokes their API tokens."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import set_actor
from app.core.errors import DomainError
from app.core.models import ROLES
from app.dashboard import sessions
from app.dashboard.web import act, form_of, redirect, render, say, signed_in
from app.ops import security
from app.services import services, transaction

router = APIRouter(prefix="/ops", include_in_schema=False)

BACK = "/ops/users"


def tenants_field(value: str | None) -> list[str] | None:
    """The form's comma- or space-separated tenants; None (every tenant) when empty."""
    names = [name for name in re.split(r"[\s,]+", (value or "").strip()) if name]
    return names or None


async def _page(
    request: Request, who: sessions.SignedIn, created: security.NewUser | None = None
) -> Response:
    async with transaction(request) as session:
        users = await security.list_users(session)
    context: dict[str, Any] = {"users": users, "roles": ROLES, "created": created}
    return await render(request, "users.html", who, context)


@router.get("/users")
async def users_page(request: Request) -> Response:
    who = await signed_in(request, "admin")
    return await _page(request, who)


@router.post("/users")
async def add_user(request: Request) -> Response:
    who, form = await form_of(request, "admin")
    username = form.get("username", "").strip()
    try:
        async with transaction(request) as session:
            await set_actor(session, f"user:{who.user.username}")
            created = await security.add_user(
                session,
                username,
                form.get("role", ""),
                tenants=tenants_field(form.get("tenants")),
                token_days=services(request).settings.token_ttl_days,
            )
    except DomainError as exc:
        await say(request, who, f"Not added: {exc.message}")
        return redirect(BACK)
    security.log.info("ops_user_added", actor=who.user.username, user=created.username)
    return await _page(request, who, created)


@router.post("/users/{user_id}/role")
async def change_role(user_id: str, request: Request) -> Response:
    who, form = await form_of(request, "admin")

    async def work(session: AsyncSession) -> str:
        role = form.get("role", "")
        user = await security.change_role(session, who.user, user_id, role)
        return f"{user.username} is now {role}."

    return await act(request, who, BACK, work, failed="Role not changed")


@router.post("/users/{user_id}/tenants")
async def set_tenants(user_id: str, request: Request) -> Response:
    """Limit a viewer or an operator to some tenants, or (empty) give them every tenant."""
    who, form = await form_of(request, "admin")

    async def work(session: AsyncSession) -> str:
        user = await security.set_scope(
            session, who.user, user_id, tenants_field(form.get("tenants"))
        )
        scope = ", ".join(user.tenants) if user.tenants is not None else "every tenant"
        return f"{user.username} now sees {scope}."

    return await act(request, who, BACK, work, failed="Tenants not changed")


@router.post("/users/{user_id}/disable")
async def disable_user(user_id: str, request: Request) -> Response:
    who, _ = await form_of(request, "admin")

    async def work(session: AsyncSession) -> str:
        user = await security.disable_user(session, who.user, user_id)
        ended = await sessions.end_all(session, user.id)
        return (
            f"{user.username} is disabled: {ended} dashboard session(s) ended, API tokens revoked."
        )

    return await act(request, who, BACK, work, failed="Not disabled")


@router.post("/users/{user_id}/enable")
async def enable_user(user_id: str, request: Request) -> Response:
    who, _ = await form_of(request, "admin")

    async def work(session: AsyncSession) -> str:
        user = await security.enable_user(session, who.user, user_id)
        return (
            f"{user.username} is enabled again and can sign in with their password; their old API"
            " tokens stay revoked."
        )

    return await act(request, who, BACK, work, failed="Not enabled")
