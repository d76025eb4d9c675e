"""The ops JSON API's policy endpoints: bearer-token authentication, role checks, validation of
policy changes, and how ops identities are stored."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest

from app.main import create_app

POLICY = "/api/ops/policy"

POLICY_FIELDS = {
    "autopatch_enabled",
    "autopatch_whitelist",
    "autopatch_max_severity",
    "min_confidence",
    "canary_percent",
    "approvals_required",
    "approval_min_severity",
    "approval_ttl_s",
    "max_concurrent_actions",
    "max_concurrent_actions_per_tenant",
    "cooldown_s",
    "updated_at",
    "updated_by",
}


@pytest.fixture
async def lenient_client(settings) -> AsyncIterator[httpx.AsyncClient]:
    """Like `client`, but an unhandled server error comes back as the HTTP response a real
    client would get (500) instead of being raised inside the test."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://selfheal.test") as http:
            yield http


def assert_unauthorized(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"code": "unauthorized", "message": message}}


def policy_row(db) -> dict:
    cur = db.execute("SELECT * FROM ops_policy WHERE id = 1")
    names = [column.name for column in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


# --- authentication -------------------------------------------------------------------------


async def test_get_policy_without_authorization_header_is_401_with_bearer_challenge(client):
    response = await client.get(POLICY)
    assert_unauthorized(response, "Authorization: Bearer <token> is required")


MALFORMED_HEADERS = ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc", "bearer-abc", ""]


async def test_get_policy_with_malformed_authorization_header_is_401(client):
    for header in MALFORMED_HEADERS:
        response = await client.get(POLICY, headers={"Authorization": header})
        assert_unauthorized(response, "Authorization: Bearer <token> is required")


async def test_get_policy_with_unknown_token_is_401(client, viewer):
    wrong = viewer.token[:-4] + ("AAAA" if not viewer.token.endswith("AAAA") else "BBBB")
    response = await client.get(POLICY, headers={"Authorization": f"Bearer {wrong}"})
    assert_unauthorized(response, "invalid or revoked token")


async def test_disabled_user_token_is_refused_with_401(client, db, operator):
    assert (await client.get(POLICY, headers=operator.auth)).status_code == 200
    cur = db.execute(
        "UPDATE ops_users SET disabled_at = now() WHERE username = %s", (operator.username,)
    )
    assert cur.rowcount == 1
    response = await client.get(POLICY, headers=operator.auth)
    assert_unauthorized(response, "invalid or revoked token")


async def test_revoked_token_is_refused_with_401(client, db, viewer):
    cur = db.execute(
        "UPDATE ops_api_tokens SET revoked_at = now()"
        " WHERE user_id = (SELECT id FROM ops_users WHERE username = %s)",
        (viewer.username,),
    )
    assert cur.rowcount == 1
    assert_unauthorized(await client.get(POLICY, headers=viewer.auth), "invalid or revoked token")


# --- GET /api/ops/policy --------------------------------------------------------------------


async def test_every_role_reads_the_default_policy(client, viewer, operator, admin):
    for persona in (viewer, operator, admin):
        response = await client.get(POLICY, headers=persona.auth)
        assert response.status_code == 200, (persona.role, response.text)
        body = response.json()
        assert set(body) == POLICY_FIELDS
        assert body["autopatch_enabled"] is False
        assert body["autopatch_whitelist"] == []
        assert body["autopatch_max_severity"] == "medium"
        assert Decimal(str(body["min_confidence"])) == Decimal("0.8")
        assert body["canary_percent"] == 100
        assert body["approvals_required"] == 2
        assert body["approval_min_severity"] == "high"
        assert body["approval_ttl_s"] == 3600
        assert body["max_concurrent_actions"] == 10
        assert body["max_concurrent_actions_per_tenant"] == 2
        assert body["cooldown_s"] == 3600
        assert body["updated_by"] is None


async def test_successful_token_use_records_last_used_at(client, db, viewer):
    before = db.execute(
        "SELECT t.last_used_at FROM ops_api_tokens t JOIN ops_users u ON u.id = t.user_id"
        " WHERE u.username = %s",
        (viewer.username,),
    ).fetchone()
    assert before == (None,)
    assert (await client.get(POLICY, headers=viewer.auth)).status_code == 200
    (used,) = db.execute(
        "SELECT t.last_used_at FROM ops_api_tokens t JOIN ops_users u ON u.id = t.user_id"
        " WHERE u.username = %s",
        (viewer.username,),
    ).fetchone()
    assert used is not None


# --- PUT /api/ops/policy --------------------------------------------------------------------


async def test_put_policy_below_admin_is_403_and_changes_nothing(client, db, viewer, operator):
    before = policy_row(db)
    for user in (viewer, operator):
        response = await client.put(POLICY, headers=user.auth, json={"autopatch_enabled": True})
        assert response.status_code == 403
        assert response.json() == {
            "error": {
                "code": "forbidden",
                "message": f"this needs the admin role; you are {user.role}",
            }
        }
    assert policy_row(db) == before


async def test_admin_put_policy_changes_the_database_row(client, db, admin):
    response = await client.put(
        POLICY,
        headers=admin.auth,
        json={
            "autopatch_enabled": True,
            "autopatch_whitelist": ["merchant-1", "merchant-2"],
            "autopatch_max_severity": "high",
            "min_confidence": 0.9,
            "canary_percent": 20,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["autopatch_enabled"] is True
    assert body["autopatch_whitelist"] == ["merchant-1", "merchant-2"]
    assert body["autopatch_max_severity"] == "high"
    assert Decimal(str(body["min_confidence"])) == Decimal("0.9")
    assert body["canary_percent"] == 20
    assert body["updated_by"] == "user:ada"

    row = policy_row(db)
    assert row["autopatch_enabled"] is True
    assert row["autopatch_whitelist"] == ["merchant-1", "merchant-2"]
    assert row["autopatch_max_severity"] == "high"
    assert row["min_confidence"] == Decimal("0.900")
    assert row["canary_percent"] == 20
    assert row["updated_by"] == "user:ada"
    # Fields not given are untouched.
    assert row["approvals_required"] == 2
    assert row["cooldown_s"] == 3600

    # A later GET (any role) sees the change.
    again = await client.get(POLICY, headers=admin.auth)
    assert again.json()["autopatch_whitelist"] == ["merchant-1", "merchant-2"]


async def test_put_policy_with_unknown_field_is_422_naming_it(client, db, admin):
    before = policy_row(db)
    response = await client.put(
        POLICY, headers=admin.auth, json={"autopatch_enabled": True, "kill_everything": 1}
    )
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "code": "validation_error",
            "message": "kill_everything: unknown field",
            "field": "kill_everything",
        }
    }
    assert policy_row(db) == before


async def test_put_policy_with_min_confidence_above_one_is_422_naming_it(client, db, admin):
    before = policy_row(db)
    response = await client.put(POLICY, headers=admin.auth, json={"min_confidence": 1.5})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == "min_confidence"
    assert error["message"].startswith("min_confidence: ")
    assert policy_row(db) == before


async def test_put_policy_with_unknown_severity_is_422(client, db, admin):
    before = policy_row(db)
    response = await client.put(
        POLICY, headers=admin.auth, json={"autopatch_max_severity": "extreme"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == "autopatch_max_severity"
    assert policy_row(db) == before


async def test_put_policy_with_empty_body_is_422(client, db, admin):
    before = policy_row(db)
    response = await client.put(POLICY, headers=admin.auth, json={})
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "code": "validation_error",
            "message": "give at least one policy field to change",
        }
    }
    assert policy_row(db) == before


async def test_put_policy_with_string_for_boolean_is_422(client, admin):
    response = await client.put(POLICY, headers=admin.auth, json={"autopatch_enabled": "true"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "autopatch_enabled"


async def test_put_policy_with_null_for_a_required_column_is_422_not_500(lenient_client, db, admin):
    """Omitted means "keep"; an explicit JSON null for a NOT NULL column is a client error, not a
    database error surfacing as 500 (was a bug: PolicyUpdate fields are `T | None = None`)."""
    before = policy_row(db)
    answers = {}
    for field in ("autopatch_enabled", "autopatch_whitelist", "min_confidence", "cooldown_s"):
        response = await lenient_client.put(POLICY, headers=admin.auth, json={field: None})
        answers[field] = (response.status_code, response.json()["error"].get("field"))
    assert answers == {
        "autopatch_enabled": (422, "autopatch_enabled"),
        "autopatch_whitelist": (422, "autopatch_whitelist"),
        "min_confidence": (422, "min_confidence"),
        "cooldown_s": (422, "cooldown_s"),
    }
    assert policy_row(db) == before


# --- storage of identities ------------------------------------------------------------------


async def test_api_tokens_are_stored_as_sha256_and_passwords_as_argon2id(
    db, viewer, operator, admin
):
    for persona in (viewer, operator, admin):
        rows = db.execute(
            "SELECT t::text, t.token_hash, u::text, u.password_hash"
            " FROM ops_api_tokens t JOIN ops_users u ON u.id = t.user_id"
            " WHERE u.username = %s",
            (persona.username,),
        ).fetchall()
        assert len(rows) == 1
        token_row, token_hash, user_row, password_hash = rows[0]
        assert persona.token not in token_row
        assert persona.token not in user_row
        assert persona.token.encode() not in bytes(token_hash)
        assert bytes(token_hash) == hashlib.sha256(persona.token.encode()).digest()
        assert password_hash.startswith("$argon2id$")

    # Nowhere in either table, in any column.
    for table in ("ops_api_tokens", "ops_users"):
        for persona in (viewer, operator, admin):
            (hits,) = db.execute(
                f"SELECT count(*) FROM {table} x WHERE strpos(x::text, %s) > 0",
                (persona.token,),
            ).fetchone()
            assert hits == 0


async def test_put_policy_refuses_a_whitelist_entry_that_is_not_a_tenant_id(client, admin, db):
    for entry in ("a\u0000b", "", " merchant", "x" * 201):
        response = await client.put(
            "/api/ops/policy", json={"autopatch_whitelist": [entry]}, headers=admin.auth
        )
        assert response.status_code == 422, (entry, response.text)
        assert response.json()["error"]["field"] == "autopatch_whitelist[0]"
    assert db.execute("SELECT autopatch_whitelist FROM ops_policy").fetchone() == ([],)
