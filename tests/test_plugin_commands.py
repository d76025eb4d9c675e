"""Commands a plugin polls (docs/contracts.md, "Plugin API"): handed out in heartbeat responses under
a lease, redelivered when the lease runs out, never after expiry or max_deliveries, held back
while autopatch is off when automatic; ack and fail are idempotent and a plugin can only
touch its own commands."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

import httpx
import orjson

from tests.support.api import serve
from tests.support.plugins import Plugin, queue_command, send_heartbeat
from tests.support.settings import make_settings

PAYLOAD = {
    "version": "1.2.3",
    "artifact_url": "https://releases.example/payments-1.2.3.zip",
    "sha256": "ab" * 32,
    "signature": "c2lnbmF0dXJl",
    "signed": "payments|1.2.3|" + "ab" * 32,
}


# --------------------------------------------------------------------------- helpers


async def add_command(
    settings: Any,
    plugin: Plugin,
    *,
    type: str = "update",
    payload: dict[str, Any] | None = None,
    **options: Any,
) -> str:
    return await queue_command(
        settings, plugin, type=type, payload=PAYLOAD if payload is None else payload, **options
    )


def command_row(db: Any, command_id: str) -> dict[str, Any]:
    cursor = db.execute(
        "SELECT status, delivery_count, delivered_at, lease_expires_at, expires_at, acked_at,"
        " failed_at, result, error, retryable, installation_id::text AS installation_id,"
        " lease_expires_at > now() AS leased"
        " FROM plugin_agent_commands WHERE id = %s",
        (command_id,),
    )
    row = cursor.fetchone()
    assert row is not None
    return dict(zip([c.name for c in cursor.description], row, strict=True))


def expire_lease(db: Any, command_id: str) -> None:
    db.execute(
        "UPDATE plugin_agent_commands SET lease_expires_at = now() - interval '1 second'"
        " WHERE id = %s",
        (command_id,),
    )


def set_autopatch(db: Any, enabled: bool) -> None:
    db.execute("UPDATE ops_policy SET autopatch_enabled = %s WHERE id = 1", (enabled,))


async def commands_in_heartbeat(client: httpx.AsyncClient, plugin: Plugin) -> list[dict[str, Any]]:
    response = await send_heartbeat(client, plugin)
    assert response.status_code == 200, response.text
    commands: list[dict[str, Any]] = response.json()["commands"]
    return commands


def ids(commands: list[dict[str, Any]]) -> list[str]:
    return [command["id"] for command in commands]


async def signed_post(
    client: httpx.AsyncClient, plugin: Plugin, path: str, payload: Any
) -> httpx.Response:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return await client.post(path, content=body, headers=plugin.headers(body, path))


async def ack(
    client: httpx.AsyncClient, plugin: Plugin, command_id: str, payload: Any
) -> httpx.Response:
    return await signed_post(client, plugin, f"/api/plugins/commands/{command_id}/ack", payload)


async def fail(
    client: httpx.AsyncClient, plugin: Plugin, command_id: str, payload: Any
) -> httpx.Response:
    return await signed_post(client, plugin, f"/api/plugins/commands/{command_id}/fail", payload)


def assert_error(
    response: httpx.Response, status: int, code: str, field: str | None = None
) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    if field is None:
        assert set(error) == {"code", "message"}, error
    else:
        assert error == {"code": code, "message": error["message"], "field": field}


# --------------------------------------------------------------------------- delivery


async def test_pending_command_is_delivered_in_next_heartbeat(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    before = command_row(db, command_id)
    assert (before["status"], before["delivery_count"], before["lease_expires_at"]) == (
        "pending",
        0,
        None,
    )
    commands = await commands_in_heartbeat(client, plugin)
    assert len(commands) == 1
    command = commands[0]
    assert set(command) == {"id", "type", "payload", "expires_at"}
    assert command["id"] == command_id
    assert command["type"] == "update"
    assert command["payload"] == PAYLOAD
    assert datetime.fromisoformat(command["expires_at"]) == before["expires_at"]
    row = command_row(db, command_id)
    assert row["status"] == "delivered"
    assert row["delivery_count"] == 1
    assert row["delivered_at"] is not None
    assert row["leased"] is True
    lease = (row["lease_expires_at"] - row["delivered_at"]).total_seconds()
    assert lease == settings.command_lease_s


async def test_commands_are_delivered_oldest_first_and_only_to_their_plugin(
    settings, client, plugin, other_plugin, db
):
    first = await add_command(settings, plugin, type="config", payload={"log_level": "debug"})
    second = await add_command(settings, plugin, type="rollback")
    theirs = await add_command(settings, other_plugin)
    commands = await commands_in_heartbeat(client, plugin)
    assert ids(commands) == [first, second]
    assert [c["type"] for c in commands] == ["config", "rollback"]
    assert commands[0]["payload"] == {"log_level": "debug"}
    assert command_row(db, theirs)["status"] == "pending"
    assert ids(await commands_in_heartbeat(client, other_plugin)) == [theirs]


async def test_delivered_command_is_not_redelivered_while_leased(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    for _ in range(3):
        assert await commands_in_heartbeat(client, plugin) == []
    row = command_row(db, command_id)
    assert (row["status"], row["delivery_count"]) == ("delivered", 1)


async def test_expired_lease_makes_command_deliverable_again(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    first_delivery = command_row(db, command_id)
    expire_lease(db, command_id)
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    row = command_row(db, command_id)
    assert (row["status"], row["delivery_count"], row["leased"]) == ("delivered", 2, True)
    assert row["delivered_at"] > first_delivery["delivered_at"]
    assert await commands_in_heartbeat(client, plugin) == []


async def test_real_lease_timeout_redelivers_command(settings, plugin, db):
    short = make_settings(
        settings.database_url, settings.redis_url, settings.redis_prefix, command_lease_s=1
    )
    command_id = await add_command(short, plugin)
    async with serve(short) as (_, client):
        assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
        assert await commands_in_heartbeat(client, plugin) == []
        await asyncio.sleep(1.1)
        assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    assert command_row(db, command_id)["delivery_count"] == 2


async def test_command_is_not_delivered_after_max_deliveries(settings, client, plugin, db):
    command_id = await add_command(settings, plugin, max_deliveries=2)
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    expire_lease(db, command_id)
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    expire_lease(db, command_id)
    for _ in range(2):
        assert await commands_in_heartbeat(client, plugin) == []
    assert command_row(db, command_id)["delivery_count"] == 2


async def test_expired_command_is_not_delivered(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    delivered_then_expired = await add_command(settings, plugin, type="config")
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id, delivered_then_expired]
    db.execute(
        "UPDATE plugin_agent_commands SET expires_at = now() - interval '1 second',"
        " lease_expires_at = now() - interval '1 second'"
    )
    never_delivered = await add_command(settings, plugin, type="rollback")
    db.execute(
        "UPDATE plugin_agent_commands SET expires_at = now() - interval '1 second' WHERE id = %s",
        (never_delivered,),
    )
    assert await commands_in_heartbeat(client, plugin) == []
    assert command_row(db, never_delivered)["delivery_count"] == 0
    assert command_row(db, never_delivered)["status"] == "pending"
    assert command_row(db, command_id)["delivery_count"] == 1


async def test_automatic_command_waits_until_autopatch_is_enabled(settings, client, plugin, db):
    set_autopatch(db, False)  # the default, as in the runbook
    automatic = await add_command(settings, plugin, automatic=True)
    manual = await add_command(settings, plugin, type="config", payload={"a": 1})
    # An operator's (non-automatic) command goes out; the automatic one is held back.
    assert ids(await commands_in_heartbeat(client, plugin)) == [manual]
    assert await commands_in_heartbeat(client, plugin) == []
    row = command_row(db, automatic)
    assert (row["status"], row["delivery_count"]) == ("pending", 0)

    set_autopatch(db, True)
    assert ids(await commands_in_heartbeat(client, plugin)) == [automatic]
    assert command_row(db, automatic)["delivery_count"] == 1

    # The plugin had it when the kill switch was engaged: it is held, never handed out again
    # once its lease runs out, not even after the switch is back on (the healing loop ends its
    # attempt: tests/test_loose_ends.py).
    set_autopatch(db, False)
    expire_lease(db, automatic)
    assert await commands_in_heartbeat(client, plugin) == []
    set_autopatch(db, True)
    assert await commands_in_heartbeat(client, plugin) == []
    row = command_row(db, automatic)
    assert (row["status"], row["delivery_count"]) == ("delivered", 1)
    assert db.execute(
        "SELECT held_at IS NOT NULL FROM plugin_agent_commands WHERE id = %s", (automatic,)
    ).fetchone() == (True,)


async def test_concurrent_heartbeats_never_get_the_same_command(settings, plugin, db):
    async with serve(settings) as (_, first), serve(settings) as (_, second):
        for round_ in range(6):
            command_id = await add_command(settings, plugin)
            clients = (first, first) if round_ % 2 == 0 else (first, second)
            responses = await asyncio.gather(*(send_heartbeat(c, plugin) for c in clients))
            assert [r.status_code for r in responses] == [200, 200]
            handed = [c["id"] for r in responses for c in r.json()["commands"]]
            assert handed == [command_id], (round_, handed)
            assert command_row(db, command_id)["delivery_count"] == 1
    assert db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone() == (12,)


# --------------------------------------------------------------------------- ack and fail


async def test_ack_marks_command_acked_with_result(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    response = await ack(client, plugin, command_id, {"result": {"version": "1.2.3", "ok": True}})
    assert response.status_code == 200, response.text
    assert response.json() == {"id": command_id, "status": "acked"}
    row = command_row(db, command_id)
    assert row["status"] == "acked"
    assert row["result"] == {"version": "1.2.3", "ok": True}
    assert row["acked_at"] is not None
    assert row["failed_at"] is None
    # An acked command is never handed out again, lease or not.
    expire_lease(db, command_id)
    assert await commands_in_heartbeat(client, plugin) == []


async def test_ack_without_body_or_result_is_accepted(settings, client, plugin, db):
    empty = await add_command(settings, plugin)
    no_result = await add_command(settings, plugin)
    assert (await ack(client, plugin, empty, b"")).json() == {"id": empty, "status": "acked"}
    assert (await ack(client, plugin, no_result, {})).json() == {"id": no_result, "status": "acked"}
    assert command_row(db, empty)["result"] == {}
    assert command_row(db, no_result)["result"] == {}


async def test_double_ack_is_harmless(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    first = await ack(client, plugin, command_id, {"result": {"n": 1}})
    assert first.status_code == 200, first.text
    row = command_row(db, command_id)
    second = await ack(client, plugin, command_id, {"result": {"n": 2}})
    assert second.status_code == 200, second.text
    assert second.json() == {"id": command_id, "status": "acked"}
    assert command_row(db, command_id) == row  # result and acked_at unchanged


async def test_ack_of_another_plugins_command_is_not_found(
    settings, client, plugin, other_plugin, db
):
    theirs = await add_command(settings, other_plugin)
    assert ids(await commands_in_heartbeat(client, other_plugin)) == [theirs]
    before = command_row(db, theirs)
    assert_error(await ack(client, plugin, theirs, {"result": {}}), 404, "not_found")
    assert_error(await fail(client, plugin, theirs, {"error": "x"}), 404, "not_found")
    assert command_row(db, theirs) == before


async def test_ack_of_unknown_command_is_not_found(client, plugin):
    assert_error(await ack(client, plugin, str(uuid.uuid4()), {"result": {}}), 404, "not_found")
    assert_error(await fail(client, plugin, str(uuid.uuid4()), {"error": "x"}), 404, "not_found")
    for bad_id in ("not-a-uuid", "1", "00000000-0000-0000-0000-00000000000z"):
        assert_error(await ack(client, plugin, bad_id, {"result": {}}), 404, "not_found")
        assert_error(await fail(client, plugin, bad_id, {"error": "x"}), 404, "not_found")


async def test_fail_marks_command_failed(settings, client, plugin, db):
    command_id = await add_command(settings, plugin, max_deliveries=1)  # no retry left
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    response = await fail(client, plugin, command_id, {"error": "disk full", "retryable": True})
    assert response.status_code == 200, response.text
    assert response.json() == {"id": command_id, "status": "failed"}
    row = command_row(db, command_id)
    assert (row["status"], row["error"], row["retryable"]) == ("failed", "disk full", True)
    assert row["failed_at"] is not None
    assert row["acked_at"] is None
    assert row["result"] is None
    expire_lease(db, command_id)
    assert await commands_in_heartbeat(client, plugin) == []


async def test_fail_defaults_to_not_retryable(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    response = await fail(client, plugin, command_id, {"error": "bad signature on artifact"})
    assert response.json() == {"id": command_id, "status": "failed"}
    assert command_row(db, command_id)["retryable"] is False


async def test_retryable_fail_is_retried_within_the_delivery_budget(settings, client, plugin, db):
    command_id = await add_command(settings, plugin, max_deliveries=2)
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    # A transient failure (the download timed out) with a delivery left: back to pending, and
    # the next heartbeat hands it out again.
    first = await fail(client, plugin, command_id, {"error": "timeout", "retryable": True})
    assert first.status_code == 200, first.text
    assert first.json() == {"id": command_id, "status": "pending"}
    row = command_row(db, command_id)
    assert (row["status"], row["error"], row["retryable"], row["failed_at"]) == (
        "pending",
        "timeout",
        True,
        None,
    )
    assert ids(await commands_in_heartbeat(client, plugin)) == [command_id]
    # The budget is spent (2 deliveries of 2): the same failure is final.
    last = await fail(client, plugin, command_id, {"error": "timeout again", "retryable": True})
    assert last.json() == {"id": command_id, "status": "failed"}
    row = command_row(db, command_id)
    assert (row["status"], row["delivery_count"], row["error"]) == ("failed", 2, "timeout again")
    expire_lease(db, command_id)
    assert await commands_in_heartbeat(client, plugin) == []

    # A failure that is not retryable is final at once, deliveries left or not.
    other = await add_command(settings, plugin, max_deliveries=5)
    assert ids(await commands_in_heartbeat(client, plugin)) == [other]
    refused = await fail(client, plugin, other, {"error": "bad signature", "retryable": False})
    assert refused.json() == {"id": other, "status": "failed"}
    # An expired command is not retried either.
    expired = await add_command(settings, plugin, max_deliveries=5)
    assert ids(await commands_in_heartbeat(client, plugin)) == [expired]
    db.execute(
        "UPDATE plugin_agent_commands SET expires_at = now() - interval '1 second' WHERE id = %s",
        (expired,),
    )
    late = await fail(client, plugin, expired, {"error": "timeout", "retryable": True})
    assert late.json() == {"id": expired, "status": "failed"}


async def test_double_fail_is_harmless(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    first = await fail(client, plugin, command_id, {"error": "first", "retryable": False})
    assert first.status_code == 200, first.text
    row = command_row(db, command_id)
    second = await fail(client, plugin, command_id, {"error": "second", "retryable": True})
    assert second.status_code == 200, second.text
    assert second.json() == {"id": command_id, "status": "failed"}
    assert command_row(db, command_id) == row


async def test_ack_after_fail_conflicts(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    assert (await fail(client, plugin, command_id, {"error": "boom"})).status_code == 200
    row = command_row(db, command_id)
    assert_error(await ack(client, plugin, command_id, {"result": {}}), 409, "conflict")
    assert command_row(db, command_id) == row


async def test_fail_after_ack_conflicts(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    assert (await ack(client, plugin, command_id, {"result": {"ok": 1}})).status_code == 200
    row = command_row(db, command_id)
    assert_error(await fail(client, plugin, command_id, {"error": "late"}), 409, "conflict")
    assert command_row(db, command_id) == row


async def test_replayed_ack_is_rejected(settings, plugin, db):
    command_id = await add_command(settings, plugin)
    path = f"/api/plugins/commands/{command_id}/ack"
    body = orjson.dumps({"result": {"ok": True}})
    headers = plugin.headers(body, path)
    async with serve(settings) as (_, first), serve(settings) as (_, second):
        assert (await first.post(path, content=body, headers=headers)).status_code == 200
        row = command_row(db, command_id)
        assert_error(await first.post(path, content=body, headers=headers), 401, "replay")
        assert_error(await second.post(path, content=body, headers=headers), 401, "replay")
    assert command_row(db, command_id) == row


async def test_replayed_fail_is_rejected(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    path = f"/api/plugins/commands/{command_id}/fail"
    body = orjson.dumps({"error": "boom"})
    headers = plugin.headers(body, path)
    assert (await client.post(path, content=body, headers=headers)).status_code == 200
    assert_error(await client.post(path, content=body, headers=headers), 401, "replay")


async def test_unsigned_or_missigned_ack_is_rejected(settings, client, plugin, other_plugin, db):
    command_id = await add_command(settings, plugin)
    path = f"/api/plugins/commands/{command_id}/ack"
    body = b'{"result":{}}'
    assert_error(await client.post(path, content=body), 401, "missing_header")
    wrong = plugin.headers(body, path, secret=other_plugin.secret)
    assert_error(await client.post(path, content=body, headers=wrong), 401, "bad_signature")
    # A signature for another command's path does not carry over.
    other_path = f"/api/plugins/commands/{uuid.uuid4()}/ack"
    moved = plugin.headers(body, other_path)
    assert_error(await client.post(path, content=body, headers=moved), 401, "bad_signature")
    assert command_row(db, command_id)["status"] == "pending"


async def test_ack_and_fail_bodies_are_validated(settings, client, plugin, db):
    command_id = await add_command(settings, plugin)
    assert_error(
        await ack(client, plugin, command_id, {"result": {}, "foo": 1}),
        422,
        "validation_error",
        "foo",
    )
    assert_error(
        await ack(client, plugin, command_id, {"result": [1]}), 422, "validation_error", "result"
    )
    assert_error(await ack(client, plugin, command_id, b"nope"), 422, "invalid_json")
    assert_error(await fail(client, plugin, command_id, {}), 422, "validation_error", "error")
    assert_error(
        await fail(client, plugin, command_id, {"error": ""}), 422, "validation_error", "error"
    )
    assert_error(
        await fail(client, plugin, command_id, {"error": "x", "retryable": "yes"}),
        422,
        "validation_error",
        "retryable",
    )
    assert_error(
        await fail(client, plugin, command_id, {"error": "x", "extra": 1}),
        422,
        "validation_error",
        "extra",
    )
    assert command_row(db, command_id)["status"] == "pending"


async def test_ack_and_fail_values_postgres_cannot_store_are_rejected(settings, client, plugin, db):
    """Like heartbeat meta: a NUL character (or an integer beyond 64 bits) in what the plugin
    sends is a 422 naming the field, not a 500."""
    command_id = await add_command(settings, plugin)
    cases = [
        ("ack result with NUL", ack, b'{"result":{"log":"a\\u0000b"}}', "result"),
        (
            "ack result with 100-bit int",
            ack,
            b'{"result":{"n":1234567890123456789012345678}}',
            "result",
        ),
        ("fail error with NUL", fail, b'{"error":"a\\u0000b"}', "error"),
    ]
    wrong = []
    for name, action, raw, field in cases:
        try:
            response = await action(client, plugin, command_id, raw)
        except Exception as exc:  # the in-process transport re-raises what became a 500
            first_line = str(exc).splitlines()[0][:100]
            wrong.append(f"{name}: 500 ({type(exc).__name__}: {first_line})")
            continue
        error = response.json().get("error", {})
        if (response.status_code, error.get("code"), error.get("field")) != (
            422,
            "validation_error",
            field,
        ):
            wrong.append(f"{name}: {response.status_code} {response.text[:120]}")
    assert not wrong, "\n".join(wrong)
    assert command_row(db, command_id)["status"] == "pending"
