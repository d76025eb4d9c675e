"""Heartbeat body validation (docs/contracts.md, "Plugin API"): every request here is correctly
signed, so what is judged is the body alone. Malformed or unknown fields are a 422 naming the
field, an oversized body a 413, and nothing of a rejected request is stored."""

from __future__ import annotations

import itertools
import json
import random
import string
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest

from app.core.settings import Settings
from tests.support.api import serve
from tests.support.plugins import HEARTBEAT, Plugin, heartbeat_body

_MISSING = object()


# --------------------------------------------------------------------------- helpers


def stored(db: Any) -> int:
    return db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()[0]


def heartbeat_count(db: Any, plugin: Plugin) -> int:
    row = db.execute("SELECT heartbeat_count FROM merchant_plugins WHERE id = %s", (plugin.id,))
    return row.fetchone()[0]


def assert_error(
    response: httpx.Response, status: int, code: str, field: Any = _MISSING
) -> dict[str, Any]:
    """The one error shape: {"error": {"code", "message", "field"?}}. field=None: no field."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"], body
    error: dict[str, Any] = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    if field is None:
        assert set(error) == {"code", "message"}, error
    elif field is not _MISSING:
        assert set(error) == {"code", "message", "field"}, error
        assert error["field"] == field, error
    return error


def base() -> dict[str, Any]:
    return orjson.loads(heartbeat_body())


_uptime = iter(range(1, 10_000_000))


def with_field(path: str, value: Any) -> dict[str, Any]:
    """A valid heartbeat with one field replaced (value _MISSING: removed)."""
    body = base()
    body["uptime_s"] = next(_uptime)
    target = body
    *parents, leaf = path.split(".")
    for parent in parents:
        target = target[parent]
    if value is _MISSING:
        del target[leaf]
    else:
        target[leaf] = value
    return body


async def post_signed(client: httpx.AsyncClient, plugin: Plugin, body: bytes) -> httpx.Response:
    return await client.post(HEARTBEAT, content=body, headers=plugin.headers(body, HEARTBEAT))


async def check_rejected(
    client: httpx.AsyncClient,
    plugin: Plugin,
    db: Any,
    field: str,
    values: list[Any],
) -> None:
    for value in values:
        body = orjson.dumps(with_field(field, value))
        error = assert_error(
            await post_signed(client, plugin, body), 422, "validation_error", field
        )
        assert error["message"].startswith(f"{field}: "), (value, error)
    assert stored(db) == 0
    assert heartbeat_count(db, plugin) == 0


# --------------------------------------------------------------------------- fields


async def test_valid_heartbeat_is_accepted(client, plugin, db):
    # The limits themselves are valid: a 64-character version, uptime 0, rates 0 and 1.
    body = with_field("plugin_version", "1" * 64)
    body["uptime_s"] = 0
    body["telemetry"] |= {"error_rate": 0.0, "webhook_fail_rate": 1.0, "webhook_failures": 50}
    response = await post_signed(client, plugin, orjson.dumps(body))
    assert response.status_code == 200, response.text
    assert stored(db) == 1


async def test_minimal_heartbeat_is_accepted(client, plugin, db):
    response = await post_signed(client, plugin, b'{"plugin_version":"1.2.3-rc.1"}')
    assert response.status_code == 200, response.text
    assert stored(db) == 1


async def test_bad_plugin_version_is_rejected(client, plugin, db):
    await check_rejected(
        client,
        plugin,
        db,
        "plugin_version",
        [_MISSING, 122, 1.2, None, ["1.2.2"], "../../etc", "", "1" * 65, "v1", "1.2.2\n", " 1.2"],
    )


async def test_bad_env_is_rejected(client, plugin, db):
    await check_rejected(
        client, plugin, db, "env", ["PROD", "", "pr od", "../etc", "a" * 33, 1, None, ["prod"]]
    )


async def test_bad_uptime_is_rejected(client, plugin, db):
    await check_rejected(
        client, plugin, db, "uptime_s", [-1, "12", True, 1.5, 12.0, 10 * 365 * 86400 + 1, {}]
    )


async def test_bad_sent_at_is_rejected(client, plugin, db):
    await check_rejected(
        client,
        plugin,
        db,
        "sent_at",
        ["not a date", "2026-11-23T12:00:00", "2026-13-01T00:00:00+00:00", 1_700_000_000, ""],
    )


async def test_negative_counter_is_rejected(client, plugin, db):
    for counter in ("requests", "errors", "webhook_attempts", "errors_last_24h"):
        await check_rejected(client, plugin, db, f"telemetry.{counter}", [-1])


async def test_counter_given_as_string_or_bool_is_rejected(client, plugin, db):
    await check_rejected(client, plugin, db, "telemetry.errors", ["3", True, 3.0, None])
    await check_rejected(client, plugin, db, "telemetry.requests", ["1200", 2**53 + 1])


async def test_webhook_failures_above_attempts_is_rejected(client, plugin, db):
    await check_rejected(client, plugin, db, "telemetry.webhook_failures", [51, 1000])


async def test_rate_outside_zero_to_one_is_rejected(client, plugin, db):
    await check_rejected(client, plugin, db, "telemetry.error_rate", [1.5, -0.1, "0.5"])
    await check_rejected(client, plugin, db, "telemetry.webhook_fail_rate", [2, -1])


async def test_negative_latency_is_rejected(client, plugin, db):
    await check_rejected(client, plugin, db, "telemetry.latency_p95_ms", [-1, -0.5, "120"])


async def test_unknown_top_level_field_is_rejected(client, plugin, db):
    body = orjson.dumps(with_field("foo", 1))
    error = assert_error(await post_signed(client, plugin, body), 422, "validation_error", "foo")
    assert error["message"] == "foo: unknown field"
    assert stored(db) == 0


async def test_unknown_telemetry_field_is_rejected(client, plugin, db):
    body = orjson.dumps(with_field("telemetry.cpu", 0.5))
    error = assert_error(
        await post_signed(client, plugin, body), 422, "validation_error", "telemetry.cpu"
    )
    assert error["message"] == "telemetry.cpu: unknown field"
    assert stored(db) == 0


async def test_telemetry_and_meta_must_be_objects(client, plugin, db):
    await check_rejected(client, plugin, db, "telemetry", [[], "x", 1, None])
    await check_rejected(client, plugin, db, "meta", [[], "x", 1, None])


async def test_meta_value_postgres_cannot_store_is_rejected(client, plugin, db):
    for raw in (
        b'{"plugin_version":"1.2.2","meta":{"note":"a\\u0000b"}}',
        b'{"plugin_version":"1.2.2","meta":{"a\\u0000":1}}',
        b'{"plugin_version":"1.2.2","meta":{"big":123456789012345678901234567890}}',
    ):
        assert_error(await post_signed(client, plugin, raw), 422, "validation_error", "meta")
    assert stored(db) == 0


async def test_meta_with_literal_backslash_u0000_text_is_accepted(client, plugin, db):
    # The six characters \u0000 (a backslash, not a NUL) are ordinary text.
    raw = b'{"plugin_version":"1.2.2","meta":{"path":"C:\\\\u0000dir"}}'
    assert orjson.loads(raw)["meta"]["path"] == "C:\\u0000dir"
    response = await post_signed(client, plugin, raw)
    assert response.status_code == 200, response.text
    row = db.execute("SELECT meta->>'path' FROM plugin_heartbeats").fetchone()
    assert row == ("C:\\u0000dir",)


# --------------------------------------------------------------------------- body shape


async def test_body_that_is_not_json_is_rejected(client, plugin, db):
    for raw in (b"not json", b'{"plugin_version": "1.2.2"', b"\xff\xfe{}", b"{'a': 1}"):
        assert_error(await post_signed(client, plugin, raw), 422, "invalid_json", None)
    assert stored(db) == 0


async def test_empty_body_is_rejected(client, plugin, db):
    assert_error(await post_signed(client, plugin, b""), 422, "invalid_json", None)
    assert stored(db) == 0


async def test_body_that_is_a_json_array_or_scalar_is_rejected(client, plugin, db):
    for raw in (b"[]", b'[{"plugin_version":"1.2.2"}]', b"null", b"1", b'"1.2.2"'):
        assert_error(await post_signed(client, plugin, raw), 422, "validation_error", None)
    assert stored(db) == 0


# --------------------------------------------------------------------------- size


def padded(size: int, uptime: int | None = None) -> bytes:
    """A valid heartbeat of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = heartbeat_body(uptime_s=next(_uptime) if uptime is None else uptime)
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def test_body_at_the_size_limit_is_accepted(settings, client, plugin, db):
    response = await post_signed(client, plugin, padded(settings.max_body_bytes))
    assert response.status_code == 200, response.text
    assert stored(db) == 1


async def test_oversized_body_with_content_length_is_rejected(settings, client, plugin, db):
    body = padded(settings.max_body_bytes + 1)
    response = await post_signed(client, plugin, body)
    assert response.request.headers["content-length"] == str(settings.max_body_bytes + 1)
    assert_error(response, 413, "payload_too_large", None)
    # Refused on size before anything else, even without credentials.
    response = await client.post(HEARTBEAT, content=body)
    assert_error(response, 413, "payload_too_large", None)
    assert stored(db) == 0


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_oversized_chunked_body_is_rejected(settings, client, plugin, db):
    body = padded(settings.max_body_bytes + 1)
    response = await client.post(
        HEARTBEAT, content=_chunks(body, 4096), headers=plugin.headers(body, HEARTBEAT)
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "payload_too_large", None)
    big = b" " * (20 * settings.max_body_bytes)
    response = await client.post(
        HEARTBEAT, content=_chunks(big, 65536), headers=plugin.headers(big, HEARTBEAT)
    )
    assert_error(response, 413, "payload_too_large", None)
    assert stored(db) == 0
    # The same streaming at exactly the limit is fine.
    body = padded(settings.max_body_bytes)
    response = await client.post(
        HEARTBEAT, content=_chunks(body, 4096), headers=plugin.headers(body, HEARTBEAT)
    )
    assert response.status_code == 200, response.text
    assert stored(db) == 1


# --------------------------------------------------------------------------- fuzz

_TEXT = string.ascii_letters + string.digits + " ./-+:_\\\"'{}[]\x00\x01\n\té€😀"


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_TEXT) for _ in range(rng.randint(0, 12)))


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(12 if depth < 3 else 9)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, 1, -1, 7, 2**31, 2**53, 2**53 + 1, 2**63, 2**64, -(2**63), 10**30])
    if pick == 3:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 1.5, -0.1, 1e308, 5e-324, float("nan")])
    if pick == 4:
        return rng.choice([float("inf"), float("-inf"), 3.0, 120.25])
    if pick in (5, 6):
        return _random_text(rng)
    if pick == 7:
        return rng.choice(
            ["1.2.2", "2026-11-23T12:00:00+00:00", "2026-11-23T12:00:00", "prod", "", "../../"]
        )
    if pick == 8:
        return rng.randint(-10, 10**6)
    if pick in (9, 10):
        return {_random_text(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


_FIELDS = [
    "plugin_version",
    "env",
    "uptime_s",
    "sent_at",
    "telemetry",
    "meta",
    "telemetry.requests",
    "telemetry.errors",
    "telemetry.webhook_attempts",
    "telemetry.webhook_failures",
    "telemetry.latency_p95_ms",
    "telemetry.errors_last_24h",
    "telemetry.error_rate",
    "telemetry.webhook_fail_rate",
    "meta.x",
    "extra",
    "telemetry.extra",
]


def _dump(rng: random.Random, value: Any) -> bytes:
    # The stdlib writes what orjson refuses (big integers, NaN, Infinity, lone surrogates).
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    return text.encode("utf-8", "surrogatepass")


def _random_body(rng: random.Random, limit: int, uptimes: Iterator[int]) -> bytes:
    """Random bodies; `uptimes` keeps otherwise equal valid bodies distinct (not replays)."""
    roll = rng.random()
    if roll < 0.55:
        body = base()
        body["uptime_s"] = next(uptimes)
        for _ in range(rng.randint(0, 3)):
            path = rng.choice(_FIELDS)
            value = _MISSING if rng.random() < 0.15 else _random_value(rng)
            parent, _, leaf = path.rpartition(".")
            target = body if not parent else body.get(parent)
            if not isinstance(target, dict):
                continue
            if value is _MISSING:
                target.pop(leaf, None)
            else:
                target[leaf] = value
        return _dump(rng, body)
    if roll < 0.65:
        return _dump(rng, _random_value(rng))
    if roll < 0.75:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if roll < 0.85:
        body = bytearray(heartbeat_body(uptime_s=next(uptimes)))
        body[rng.randrange(len(body))] = rng.randrange(256)
        return bytes(body)
    if roll < 0.9:
        return padded(limit + rng.randint(1, 64), next(uptimes))
    if roll < 0.95:
        return b"[" * rng.randint(100, 2000) + b"]" * rng.randint(0, 2000)
    return heartbeat_body(uptime_s=next(uptimes))


def _random_headers(rng: random.Random, plugin: Plugin, body: bytes) -> dict[str, Any]:
    """Mostly a correct, fresh signature for `body`; otherwise one header spoiled or dropped."""
    headers: dict[str, Any] = plugin.headers(body, HEARTBEAT)
    if rng.random() < 0.7:
        return headers
    name = rng.choice(["X-Plugin-Id", "X-Timestamp", "X-Signature", "Content-Type"])
    choices: list[Any] = [
        None,
        b"",
        b" ",
        _random_text(rng).encode(),
        bytes(rng.randrange(32, 256) for _ in range(rng.randint(1, 80))),
        str(uuid.uuid4()).encode(),
        str(int(time.time()) + rng.randint(-(10**6), 10**6)).encode(),
        b"v1=" + bytes(rng.randrange(128, 256) for _ in range(64)),
        b"v1=" + "".join(rng.choice("0123456789abcdefABCDEF") for _ in range(64)).encode(),
        ",".join([headers["X-Signature"]] * rng.randint(2, 8)).encode(),
        b"-1",
        b"99999999999999999999",
    ]
    value = rng.choice(choices)
    if value is None:
        del headers[name]
    else:
        headers[name] = value
    return headers


@pytest.fixture
async def unlimited_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API without rate limits: 300 requests of one installation in a few seconds."""
    off = settings.model_copy(update={"rate_per_installation": 0, "rate_per_tenant": 0})
    async with serve(off) as (_, http):
        yield http


async def test_random_requests_never_cause_a_server_error(settings, unlimited_client, plugin, db):
    client = unlimited_client
    rng = random.Random(20261123)
    allowed = {200, 401, 413, 422}
    outcomes: dict[int, int] = {}
    problems: list[str] = []
    uptimes = itertools.count(1_000_000)
    for attempt in range(300):
        body = _random_body(rng, settings.max_body_bytes, uptimes)
        headers = _random_headers(rng, plugin, body)
        try:
            response = await client.post(HEARTBEAT, content=body, headers=headers)
        except Exception as exc:  # the in-process transport re-raises what became a 500
            problems.append(f"#{attempt}: {type(exc).__name__}: {exc} body={body[:120]!r}")
            continue
        outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
        if response.status_code not in allowed:
            problems.append(f"#{attempt}: {response.status_code} {response.text[:200]}")
        elif response.status_code != 200:
            error = response.json()["error"]
            assert set(error) <= {"code", "message", "field"}, error
            assert error["code"] and error["message"], error
    assert problems == [], "\n".join(problems)
    # The generator exercises every outcome, and exactly the accepted requests were stored.
    assert set(outcomes) == allowed, outcomes
    assert stored(db) == outcomes[200]
    assert heartbeat_count(db, plugin) == outcomes[200]
