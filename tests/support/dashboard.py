"""The ops dashboard through httpx: reading a form's CSRF token, signing in, posting a form."""

from __future__ import annotations

import re

import httpx

from tests.support.personas import Persona

SESSION_COOKIE = "selfheal_session"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    found = _CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def try_sign_in(
    client: httpx.AsyncClient, username: str, password: str, *, next_path: str | None = None
) -> httpx.Response:
    """GET the sign-in form (its CSRF cookie and field), then POST it; not followed."""
    form = await client.get("/ops/login")
    assert form.status_code == 200, form.text
    data = {"csrf_token": csrf_of(form.text), "username": username, "password": password}
    if next_path:
        data["next"] = next_path
    return await client.post("/ops/login", data=data)


async def sign_in(client: httpx.AsyncClient, persona: Persona) -> str:
    """Signed in as `persona` (the client keeps the session cookie); returns the session's
    CSRF token, read from the incidents page."""
    response = await try_sign_in(client, persona.username, persona.password)
    assert response.status_code == 303, response.text
    page = await client.get("/ops/incidents")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


async def post_form(
    client: httpx.AsyncClient, path: str, csrf: str | None, **fields: str
) -> httpx.Response:
    data = dict(fields)
    if csrf is not None:
        data["csrf_token"] = csrf
    return await client.post(path, data=data)
