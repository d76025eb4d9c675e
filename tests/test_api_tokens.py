"""Ops API tokens (issue 10, "Tokens"): each expires (SELFHEAL_TOKEN_TTL_DAYS, or --days), an
expired one gets 401 saying so, `selfheal user revoke-token` revokes, `selfheal user
issue-token` hands a new one; and a rotated plugin secret's old one lives 1 h by default."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.core.settings import Settings
from tests.support.api import serve
from tests.support.cli import one_json_object, runner
from tests.support.dashboard import sign_in
from tests.support.settings import settings_env

POLICY = "/api/ops/policy"


@pytest.fixture
def run(settings, tmp_path):
    return runner(settings_env(settings), tmp_path)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


def about(moment: datetime, expected: datetime) -> bool:
    return abs(moment - expected) < timedelta(minutes=2)


def expiry_of(db: Any, username: str) -> list[datetime]:
    rows = db.execute(
        "SELECT t.expires_at FROM ops_api_tokens t JOIN ops_users u ON u.id = t.user_id"
        " WHERE u.username = %s ORDER BY t.created_at",
        (username,),
    ).fetchall()
    return [row[0] for row in rows]


def test_defaults():
    assert Settings(database_url=None).token_ttl_days == 90
    assert Settings(database_url=None).secret_grace_s == 3600


async def test_a_token_expires_after_the_default_lifetime_or_the_days_given(run, db):
    now = datetime.now(UTC)
    added = run("user", "add", "alice", "--role", "operator", "--json")
    assert added.returncode == 0, added.stderr
    alice = one_json_object(added.stdout)
    assert about(parse(alice["token_expires_at"]), now + timedelta(days=90))
    assert expiry_of(db, "alice") == [parse(alice["token_expires_at"])]

    short = one_json_object(run("user", "add", "bob", "--days", "7", "--json").stdout)
    assert about(parse(short["token_expires_at"]), now + timedelta(days=7))
    # SELFHEAL_TOKEN_TTL_DAYS sets the default.
    carol = one_json_object(
        run("user", "add", "carol", "--json", SELFHEAL_TOKEN_TTL_DAYS="30").stdout
    )
    assert about(parse(carol["token_expires_at"]), now + timedelta(days=30))
    assert run("user", "add", "dave", "--days", "0").returncode == 2


async def test_an_expired_token_gets_401_saying_when_it_expired(settings, run, db):
    alice = one_json_object(run("user", "add", "alice", "--role", "operator", "--json").stdout)
    async with serve(settings) as (_, client):
        assert (await client.get(POLICY, headers=bearer(alice["token"]))).status_code == 200
        db.execute(
            "UPDATE ops_api_tokens SET expires_at = '2026-01-02 03:04:05+00'"
            " WHERE user_id = (SELECT id FROM ops_users WHERE username = 'alice')"
        )
        response = await client.get(POLICY, headers=bearer(alice["token"]))
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {
            "error": {
                "code": "unauthorized",
                "message": "this API token expired at 2026-01-02 03:04:05 UTC; ask an admin"
                " for a new one (`selfheal user issue-token <user name>`)",
            }
        }

        # A new token for the same user works; the expired one stays refused.
        issued = run("user", "issue-token", "alice", "--days", "1", "--json")
        assert issued.returncode == 0, issued.stderr
        fresh = one_json_object(issued.stdout)
        assert fresh["username"] == "alice"
        assert about(parse(fresh["token_expires_at"]), datetime.now(UTC) + timedelta(days=1))
        assert (await client.get(POLICY, headers=bearer(fresh["token"]))).status_code == 200
        assert (await client.get(POLICY, headers=bearer(alice["token"]))).status_code == 401


async def test_revoke_token_revokes_every_token_of_the_user_or_the_one_given(settings, run, db):
    first = one_json_object(run("user", "add", "alice", "--role", "viewer", "--json").stdout)
    second = one_json_object(run("user", "issue-token", "alice", "--json").stdout)
    other = one_json_object(run("user", "add", "bob", "--role", "viewer", "--json").stdout)
    async with serve(settings) as (_, client):
        for token in (first["token"], second["token"], other["token"]):
            assert (await client.get(POLICY, headers=bearer(token))).status_code == 200

        one = run("user", "revoke-token", "alice", "--token", first["token"], "--json")
        assert one.returncode == 0, one.stderr
        assert one_json_object(one.stdout) == {"username": "alice", "tokens_revoked": 1}
        response = await client.get(POLICY, headers=bearer(first["token"]))
        assert response.status_code == 401
        assert response.json()["error"]["message"] == "invalid or revoked token"
        assert (await client.get(POLICY, headers=bearer(second["token"]))).status_code == 200

        every = run("user", "revoke-token", "alice", "--json")
        assert every.returncode == 0, every.stderr
        assert one_json_object(every.stdout) == {"username": "alice", "tokens_revoked": 1}
        assert (await client.get(POLICY, headers=bearer(second["token"]))).status_code == 401
        # Another user's token is untouched.
        assert (await client.get(POLICY, headers=bearer(other["token"]))).status_code == 200

    # Revocation is in the audit log (who and when), without the token's hash.
    revoked = db.execute(
        "SELECT count(*) FROM audit_log WHERE entity = 'ops_api_tokens' AND action = 'update'"
        " AND new->>'revoked_at' IS NOT NULL AND NOT new ? 'token_hash'"
    ).fetchone()
    assert revoked == (2,)


def test_revoke_token_names_what_is_wrong(run):
    alice = one_json_object(run("user", "add", "alice", "--json").stdout)
    missing = run("user", "revoke-token", "nobody")
    assert missing.returncode == 1
    assert "no ops user 'nobody'" in missing.stderr
    bob = one_json_object(run("user", "add", "bob", "--json").stdout)
    wrong = run("user", "revoke-token", "alice", "--token", bob["token"])
    assert wrong.returncode == 1
    assert "that token is not a live token of alice" in wrong.stderr
    assert "Traceback" not in missing.stderr + wrong.stderr
    assert alice["token"]


async def test_the_users_page_shows_when_tokens_expire(settings, admin):
    async with serve(settings) as (_, client):
        await sign_in(client, admin)
        page = await client.get("/ops/users")
        assert page.status_code == 200
        row = page.text.split(f'id="user-{admin.username}"', 1)[1].split("</tr>", 1)[0]
        expires = (datetime.now(UTC) + timedelta(days=90)).strftime("%Y-%m-%d")
        assert "(expires <time" in row
        assert expires in row


async def test_a_bearer_that_is_not_a_token_is_refused_without_a_lookup(settings):
    """Garbage, or a random string per request, is refused on its shape: no database work."""
    async with serve(settings) as (_, client):
        for value in ("nonsense", "sht_short", "sht_" + "a" * 44, "Sht_" + "a" * 43):
            response = await client.get(POLICY, headers=bearer(value))
            assert response.status_code == 401
            assert response.json()["error"]["message"] == (
                "this is not a selfheal API token (they start with sht_)"
            )
        well_shaped = await client.get(POLICY, headers=bearer("sht_" + "a" * 43))
        assert well_shaped.status_code == 401
        assert "not a selfheal API token" not in well_shaped.text
