"""The plugin signature contract (docs/contracts.md, "Plugin authentication"): every way a request
can be unsigned, mis-signed, stale or replayed is a 401 with the JSON error shape, and nothing
is stored. Also secret rotation, multi-signature headers and the rejection metrics."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker
from app.plugins.service import rotate_secret
from app.plugins.signatures import sign
from plugin_client.signing import request_digest, response_problem
from tests.support.api import serve
from tests.support.plugins import HEARTBEAT, Plugin, heartbeat_body

ACK_PATH = "/api/plugins/commands/00000000-0000-0000-0000-000000000000/ack"


# --------------------------------------------------------------------------- helpers


def stored(db: Any) -> int:
    return db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()[0]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    # A heartbeat's replay answer names the stored request (the digest of its signed message).
    assert set(error) == {"code", "message"} | ({"request"} if code == "replay" else set()), error
    if code == "replay":
        assert len(error["request"]) == 64 and int(error["request"], 16) >= 0, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]


_bodies = iter(range(10_000_000))


def unique_body() -> bytes:
    return heartbeat_body(uptime_s=next(_bodies))


async def post(client: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await client.post(HEARTBEAT, content=body, headers=headers)


async def start_of_second() -> None:
    """Wait until the current second has just begun, so that whole-second timestamps sit at a
    known distance from the server clock while the request is in flight."""
    fraction = time.time() % 1
    if fraction > 0.8:
        await asyncio.sleep(1.01 - fraction)


async def rotate(settings: Any, plugin: Plugin, grace_s: int) -> str:
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            issued = await rotate_secret(
                session, SecretBox(settings.secret_key), uuid.UUID(plugin.id), grace_s=grace_s
            )
    finally:
        await engine.dispose()
    return issued.secret


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def rejected(values: dict[Any, float], reason: str) -> float:
    return values.get(("selfheal_heartbeats_rejected_total", (("reason", reason),)), 0.0)


def already_stored(values: dict[Any, float]) -> float:
    return values.get(("selfheal_heartbeats_already_stored_total", ()), 0.0)


def accepted(values: dict[Any, float]) -> float:
    return values.get(("selfheal_heartbeats_accepted_total", ()), 0.0)


# --------------------------------------------------------------------------- identity


async def test_unknown_plugin_id_is_rejected(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    headers["X-Plugin-Id"] = str(uuid.uuid4())
    assert_error(await post(client, body, headers), 401, "unknown_plugin")
    assert stored(db) == 0


async def test_malformed_plugin_id_is_rejected(client, plugin, db):
    for plugin_id in ("not-a-uuid", "1234", plugin.id[:-1] + "g", "' OR 1=1 --", plugin.id + "0"):
        body = unique_body()
        headers = plugin.headers(body, HEARTBEAT)
        headers["X-Plugin-Id"] = plugin_id
        assert_error(await post(client, body, headers), 401, "unknown_plugin")
    assert stored(db) == 0


async def test_missing_auth_header_is_rejected(client, plugin, db):
    for header in ("X-Plugin-Id", "X-Timestamp", "X-Signature"):
        body = unique_body()
        headers = plugin.headers(body, HEARTBEAT)
        del headers[header]
        assert_error(await post(client, body, headers), 401, "missing_header")
        headers[header] = ""  # present but empty is just as missing
        assert_error(await post(client, body, headers), 401, "missing_header")
    assert stored(db) == 0


# --------------------------------------------------------------------------- signature


async def test_signature_made_with_wrong_secret_is_rejected(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT, secret="shs_not-the-real-secret")
    assert_error(await post(client, body, headers), 401, "bad_signature")
    assert stored(db) == 0


async def test_other_plugins_secret_is_rejected(client, plugin, other_plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT, secret=other_plugin.secret)
    assert_error(await post(client, body, headers), 401, "bad_signature")
    assert stored(db) == 0


async def test_malformed_signature_header_is_rejected(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    good = headers["X-Signature"].removeprefix("v1=")
    for value in (
        "v1=",
        "v1=zz",
        "v2=" + good,
        good,
        "v1=" + good[:-1],
        "v1=" + good + "0",
        ",,,",
        "v1=" + "g" * 64,
    ):
        headers["X-Signature"] = value
        assert_error(await post(client, body, headers), 401, "bad_signature")
    assert stored(db) == 0


async def test_non_ascii_signature_header_is_rejected_not_500(client, plugin, db):
    """A header is decoded as latin-1: 64 non-ASCII characters pass the length check and reach
    hmac.compare_digest, which raises TypeError for non-ASCII str operands."""
    body = unique_body()
    headers: dict[str, Any] = plugin.headers(body, HEARTBEAT)
    headers["X-Signature"] = b"v1=" + b"\xe9" * 64
    assert_error(await post(client, body, headers), 401, "bad_signature")
    assert stored(db) == 0


async def test_every_single_changed_body_byte_is_rejected(client, plugin, db):
    body = b'{"plugin_version":"1.2.2","uptime_s":77}'
    headers = plugin.headers(body, HEARTBEAT)
    for index in range(len(body)):
        tampered = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
        assert tampered != body
        response = await post(client, tampered, headers)
        assert_error(response, 401, "bad_signature")
    for tampered in (body + b" ", body[:-1], b" " + body, b""):
        assert_error(await post(client, tampered, headers), 401, "bad_signature")
    assert stored(db) == 0
    # The signature itself was good: the untouched body is accepted.
    assert (await post(client, body, headers)).status_code == 200
    assert stored(db) == 1


async def test_signature_for_another_method_is_rejected(client, plugin, db):
    body = unique_body()
    for method in ("PUT", "GET", "PATCH"):
        headers = plugin.headers(body, HEARTBEAT, method=method)
        assert_error(await post(client, body, headers), 401, "bad_signature")
    assert stored(db) == 0


async def test_signature_for_another_path_is_rejected(client, plugin, db):
    body = unique_body()
    for signed_path in (ACK_PATH, HEARTBEAT + "/", HEARTBEAT + "?x=1", HEARTBEAT.upper(), ""):
        headers = plugin.headers(body, signed_path)
        assert_error(await post(client, body, headers), 401, "bad_signature")
    assert stored(db) == 0


async def test_query_string_is_not_part_of_the_signed_path(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    response = await client.post(HEARTBEAT + "?debug=1", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert stored(db) == 1


# --------------------------------------------------------------------------- timestamp


async def test_timestamp_more_than_300_seconds_off_is_rejected(client, plugin, db):
    for offset in (-301, 301, -3600, 86400, -int(time.time())):
        await start_of_second()
        body = unique_body()
        headers = plugin.headers(body, HEARTBEAT, timestamp=int(time.time()) + offset)
        assert_error(await post(client, body, headers), 401, "stale_timestamp")
    assert stored(db) == 0


async def test_timestamp_within_300_seconds_is_accepted(client, plugin, db):
    for offset in (-299, 299, 0):
        await start_of_second()
        body = unique_body()
        headers = plugin.headers(body, HEARTBEAT, timestamp=int(time.time()) + offset)
        response = await post(client, body, headers)
        assert response.status_code == 200, response.text
    assert stored(db) == 3


async def test_non_integer_timestamp_is_rejected(client, plugin, db):
    for value in ("abc", "-5", "1.7e9", "1700000000.5", " 1700000000", "1" * 13, "\u0661"):
        body = unique_body()
        headers: dict[str, Any] = plugin.headers(body, HEARTBEAT)
        # Signed over the bad timestamp too: only its form is wrong.
        headers["X-Timestamp"] = value.encode()
        headers["X-Signature"] = sign(plugin.secret, value, "POST", HEARTBEAT, body)
        assert_error(await post(client, body, headers), 401, "bad_timestamp")
    assert stored(db) == 0


# --------------------------------------------------------------------------- replay


async def test_replay_to_a_second_api_instance_is_rejected(settings, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    async with serve(settings) as (_, first), serve(settings) as (_, second):
        assert (await post(first, body, headers)).status_code == 200
        assert_error(await post(second, body, headers), 401, "replay")
        assert_error(await post(first, body, headers), 401, "replay")
    assert stored(db) == 1


async def test_replay_to_the_same_instance_is_rejected(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    assert (await post(client, body, headers)).status_code == 200
    for _ in range(3):
        assert_error(await post(client, body, headers), 401, "replay")
    assert stored(db) == 1
    row = db.execute("SELECT heartbeat_count FROM merchant_plugins WHERE id = %s", (plugin.id,))
    assert row.fetchone() == (1,)


async def test_a_heartbeats_replay_answer_is_signed_so_its_sender_knows_it_was_stored(
    client, plugin, db
):
    """A plugin that got no answer sends the same bytes again (plugin_client, RESEND_WITHIN_S):
    the 401 replay to a copy of a stored heartbeat is signed like a 200 and names the stored
    request, for a Content-Length body (SelfhealAPI) and a chunked one (inside the middleware
    stack), so a forged or borrowed one cannot make the plugin drop its counts. Other error
    answers stay unsigned."""
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    assert (await post(client, body, headers)).status_code == 200

    async def chunked() -> AsyncIterator[bytes]:
        yield body

    for answer in (
        await post(client, body, headers),
        await client.post(HEARTBEAT, content=chunked(), headers=headers),
    ):
        assert_error(answer, 401, "replay")
        assert (
            response_problem(plugin.secret, 401, HEARTBEAT, answer.content, answer.headers) is None
        )
        named = request_digest(headers["X-Timestamp"], "POST", HEARTBEAT, body)
        assert answer.json()["error"]["request"] == named
    assert stored(db) == 1
    forged = {**plugin.headers(unique_body(), HEARTBEAT), "X-Signature": "v1=" + "0" * 64}
    refused = await post(client, body, forged)
    assert_error(refused, 401, "bad_signature")
    assert "x-signature" not in refused.headers


async def test_concurrent_copies_of_one_request_store_one_sample(settings, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    async with serve(settings) as (_, first), serve(settings) as (_, second):
        responses = await asyncio.gather(
            *(post(client, body, headers) for client in (first, second, first, second))
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 401, 401, 401]
    for response in responses:
        if response.status_code == 401:
            assert_error(response, 401, "replay")
    assert stored(db) == 1


async def test_same_body_with_new_timestamp_is_not_a_replay(client, plugin, db):
    await start_of_second()
    body = unique_body()
    now = int(time.time())
    assert (
        await post(client, body, plugin.headers(body, HEARTBEAT, timestamp=now))
    ).status_code == 200
    second = plugin.headers(body, HEARTBEAT, timestamp=now - 1)
    assert (await post(client, body, second)).status_code == 200
    assert stored(db) == 2


# --------------------------------------------------------------------------- several signatures


async def test_bad_and_good_signature_together_are_accepted(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    good = headers["X-Signature"]
    bad = plugin.headers(body, HEARTBEAT, secret="shs_wrong", timestamp=int(headers["X-Timestamp"]))
    headers["X-Signature"] = f"{bad['X-Signature']}, {good}"
    assert (await post(client, body, headers)).status_code == 200
    # The same request carrying only the good signature is the same signed message: a replay.
    headers["X-Signature"] = good
    assert_error(await post(client, body, headers), 401, "replay")
    # ... and with the signatures in the other order too.
    headers["X-Signature"] = f"{good},{bad['X-Signature']}"
    assert_error(await post(client, body, headers), 401, "replay")
    assert stored(db) == 1


async def test_four_signatures_with_one_good_are_accepted(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    wrong = ["v1=" + format(i, "x") * 64 for i in range(3)]
    headers["X-Signature"] = ",".join([*wrong, headers["X-Signature"]])
    assert (await post(client, body, headers)).status_code == 200
    assert stored(db) == 1


async def test_more_than_four_signatures_are_rejected(client, plugin, db):
    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    good = headers["X-Signature"]
    headers["X-Signature"] = ",".join([good] * 5)
    assert_error(await post(client, body, headers), 401, "bad_signature")
    wrong = ["v1=" + format(i, "x") * 64 for i in range(4)]
    headers["X-Signature"] = ",".join([*wrong, good])
    assert_error(await post(client, body, headers), 401, "bad_signature")
    assert stored(db) == 0


# --------------------------------------------------------------------------- rotation


async def test_old_and_new_secret_are_both_accepted_during_grace(settings, plugin, db):
    async with serve(settings) as (_, api):
        body = unique_body()
        assert (await post(api, body, plugin.headers(body, HEARTBEAT))).status_code == 200
        new = await rotate(settings, plugin, grace_s=3600)
        # The cached credentials predate the rotation; a miss on an entry older than a second
        # reloads it (app/plugins/auth.py), so wait that long.
        await asyncio.sleep(1.1)
        for secret in (new, plugin.secret, new, plugin.secret):
            body = unique_body()
            response = await post(api, body, plugin.headers(body, HEARTBEAT, secret=secret))
            assert response.status_code == 200, response.text
    async with serve(settings) as (_, fresh):  # another process, nothing cached
        for secret in (plugin.secret, new):
            body = unique_body()
            response = await post(fresh, body, plugin.headers(body, HEARTBEAT, secret=secret))
            assert response.status_code == 200, response.text
    assert stored(db) == 7


async def test_old_secret_is_rejected_after_zero_grace_rotation(settings, client, plugin, db):
    new = await rotate(settings, plugin, grace_s=0)
    body = unique_body()
    assert_error(await post(client, body, plugin.headers(body, HEARTBEAT)), 401, "bad_signature")
    body = unique_body()
    assert (
        await post(client, body, plugin.headers(body, HEARTBEAT, secret=new))
    ).status_code == 200
    assert stored(db) == 1


async def test_old_secret_expires_at_end_of_grace_even_from_cache(settings, plugin, db):
    """The old key is cached *with* its expiry a fraction of a second before it expires; the
    next request comes after expiry but well within a second, so the authenticator does not
    reload: the cached key's own expiry must refuse it."""
    async with serve(settings) as (_, api):
        new = await rotate(settings, plugin, grace_s=1)
        (expires_at,) = db.execute(
            "SELECT extract(epoch FROM expires_at)::float8 FROM plugin_secrets"
            " WHERE installation_id = %s AND expires_at IS NOT NULL",
            (plugin.id,),
        ).fetchone()
        await asyncio.sleep(max(0.0, expires_at - 0.3 - time.time()))
        body = unique_body()
        response = await post(api, body, plugin.headers(body, HEARTBEAT))  # loads the cache
        assert response.status_code == 200, response.text
        await asyncio.sleep(max(0.0, expires_at + 0.15 - time.time()))
        body = unique_body()
        assert_error(await post(api, body, plugin.headers(body, HEARTBEAT)), 401, "bad_signature")
        await asyncio.sleep(1.1)  # and after a reload, still refused
        body = unique_body()
        assert_error(await post(api, body, plugin.headers(body, HEARTBEAT)), 401, "bad_signature")
        body = unique_body()
        response = await post(api, body, plugin.headers(body, HEARTBEAT, secret=new))
        assert response.status_code == 200, response.text
    assert stored(db) == 2


async def test_old_secret_cached_before_rotation_expires_at_end_of_grace(settings, plugin, db):
    """DESIGN/auth.py: "an old secret stops working exactly when its grace period ends, cache
    or not". Here the process cached the old key before the rotation (so without an expiry)."""
    async with serve(settings) as (_, api):
        body = unique_body()
        assert (await post(api, body, plugin.headers(body, HEARTBEAT))).status_code == 200
        new = await rotate(settings, plugin, grace_s=1)
        await asyncio.sleep(1.5)
        body = unique_body()
        response = await post(api, body, plugin.headers(body, HEARTBEAT))
        assert_error(response, 401, "bad_signature")
        body = unique_body()
        response = await post(api, body, plugin.headers(body, HEARTBEAT, secret=new))
        assert response.status_code == 200, response.text
    assert stored(db) == 2


# --------------------------------------------------------------------------- metrics


async def test_rejections_are_counted_by_reason_in_metrics(client, plugin, db):
    before = await scrape(client)

    body = unique_body()
    headers = plugin.headers(body, HEARTBEAT)
    assert (await post(client, body, headers)).status_code == 200
    for _ in range(3):
        assert_error(await post(client, body, headers), 401, "replay")

    body = unique_body()
    for _ in range(2):
        bad = plugin.headers(body, HEARTBEAT, secret="shs_wrong")
        assert_error(await post(client, body, bad), 401, "bad_signature")

    stale = plugin.headers(body, HEARTBEAT, timestamp=int(time.time()) - 1000)
    assert_error(await post(client, body, stale), 401, "stale_timestamp")

    unknown = plugin.headers(body, HEARTBEAT) | {"X-Plugin-Id": str(uuid.uuid4())}
    assert_error(await post(client, body, unknown), 401, "unknown_plugin")

    missing = plugin.headers(body, HEARTBEAT)
    del missing["X-Signature"]
    assert_error(await post(client, body, missing), 401, "missing_header")

    after = await scrape(client)
    # The copies of a stored heartbeat are answered with the (signed) 401 replay, but counted
    # apart: they are what plugin_client sends after a lost answer, not refusals.
    assert already_stored(after) - already_stored(before) == 3
    assert rejected(after, "replay") == rejected(before, "replay")
    assert rejected(after, "bad_signature") - rejected(before, "bad_signature") == 2
    assert rejected(after, "stale_timestamp") - rejected(before, "stale_timestamp") == 1
    assert rejected(after, "unknown_plugin") - rejected(before, "unknown_plugin") == 1
    assert rejected(after, "missing_header") - rejected(before, "missing_header") == 1
    assert accepted(after) - accepted(before) == 1
    assert stored(db) == 1


# --------------------------------------------------------------------------- cache invalidation


_distinct = itertools.count(10_000)


async def wait_for_status(client, plugin, status: int, timeout_s: float = 3.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        body = heartbeat_body(uptime_s=next(_distinct))
        response = await client.post(
            HEARTBEAT, content=body, headers=plugin.headers(body, HEARTBEAT)
        )
        if response.status_code == status or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.05)


async def test_plugin_disabled_in_psql_is_refused_by_a_process_that_cached_it(client, plugin, db):
    body = heartbeat_body(uptime_s=1)
    first = await client.post(HEARTBEAT, content=body, headers=plugin.headers(body, HEARTBEAT))
    assert first.status_code == 200
    # The credential cache lives 600 s; the NOTIFY trigger must end it at once.
    db.execute("UPDATE merchant_plugins SET status = 'disabled' WHERE id = %s", (plugin.id,))
    assert_error(await wait_for_status(client, plugin, 401), 401, "plugin_disabled")
    db.execute("UPDATE merchant_plugins SET status = 'active' WHERE id = %s", (plugin.id,))
    assert (await wait_for_status(client, plugin, 200)).status_code == 200


async def test_secret_deleted_in_psql_stops_working_in_a_process_that_cached_it(client, plugin, db):
    assert (await wait_for_status(client, plugin, 200)).status_code == 200
    db.execute("DELETE FROM plugin_secrets WHERE installation_id = %s", (plugin.id,))
    assert_error(await wait_for_status(client, plugin, 401), 401, "bad_signature")


async def test_first_heartbeats_of_many_plugins_at_once_are_all_accepted(settings, db):
    from tests.support.plugins import register

    plugins = [await register(settings, tenant=f"m{i % 5}", name="payments") for i in range(40)]
    async with serve(settings) as (_, client):
        responses = await asyncio.gather(
            *(
                client.post(HEARTBEAT, content=b, headers=p.headers(b, HEARTBEAT))
                for p in plugins
                for b in [heartbeat_body(uptime_s=7)]
            )
        )
    assert [r.status_code for r in responses] == [200] * 40
    assert stored(db) == 40
