"""Bounded inputs (issue 10, item 5): every route's body is limited before anything reads it,
the paging limits are capped.

The "before it is read" tests talk to a real uvicorn over a raw socket, as an attacker would:
they declare a 64 MiB body and send a few bytes of it, or stream a chunked body past the limit
and never end it, then wait for the answer. A server that reads (or waits for) the body before
refusing it never answers, and the bounded wait below fails the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from app.core.settings import Settings
from tests.support.api import serve, serve_http
from tests.support.personas import Persona
from tests.support.ports import free_port

MIB = 1024 * 1024
# Long enough for a busy 2-core machine; a server that waits for the body never answers.
ANSWER_WITHIN_S = 15.0


@contextlib.asynccontextmanager
async def listening(settings: Settings) -> AsyncIterator[int]:
    on_port = settings.model_copy(update={"port": free_port()})
    async with serve_http(on_port):
        yield on_port.port


async def exchange(port: int, head: str, *body: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a request head and part of its body, then read the answer without sending more.
    Also waits for the server to close the connection: it reads no more of the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        for part in body:
            writer.write(part)
        await writer.drain()
        async with asyncio.timeout(ANSWER_WITHIN_S):
            status_line = await reader.readline()
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            answer = await reader.readexactly(int(headers["content-length"]))
            rest = await reader.read()  # EOF: the server closed the connection
        assert rest == b""
        return int(status_line.split()[1]), headers, answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def chunked(total: int, piece: int = 16 * 1024) -> list[bytes]:
    """`total` bytes as HTTP/1.1 chunks, without the last (empty) chunk: the body never ends."""
    parts = []
    while total > 0:
        size = min(piece, total)
        parts.append(f"{size:x}\r\n".encode() + b"x" * size + b"\r\n")
        total -= size
    return parts


def assert_too_large(status: int, answer: bytes, limit: int) -> None:
    assert status == 413
    assert orjson.loads(answer) == {
        "error": {
            "code": "payload_too_large",
            "message": f"request body is larger than {limit} bytes",
        }
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/api/ops/policy"), ("POST", "/ops/policy"), ("POST", "/ops/login")],
)
async def test_64_mib_declared_without_a_token_is_refused_before_it_is_read(
    settings: Settings, method: str, path: str
) -> None:
    limit = (
        settings.form_max_body_bytes if path.startswith("/ops/") else settings.ops_max_body_bytes
    )
    async with listening(settings) as port:
        status, headers, answer = await exchange(
            port,
            f"{method} {path} HTTP/1.1\nHost: selfheal.test\n"
            "Content-Type: application/json\n"
            f"Content-Length: {64 * MIB}\n",
            b'{"autopatch_whitelist": [',
        )
    assert_too_large(status, answer, limit)
    assert headers["connection"] == "close"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/api/ops/policy", "application/json"),
        ("/ops/login", "application/x-www-form-urlencoded"),
        ("/api/plugins/heartbeat", "application/json"),
    ],
)
async def test_a_chunked_body_is_cut_off_once_over_the_limit(
    settings: Settings, path: str, content_type: str
) -> None:
    limit = {
        "/api/ops/policy": settings.ops_max_body_bytes,
        "/ops/login": settings.form_max_body_bytes,
        "/api/plugins/heartbeat": settings.max_body_bytes,
    }[path]
    method = "PUT" if path == "/api/ops/policy" else "POST"
    async with listening(settings) as port:
        status, _, answer = await exchange(
            port,
            f"{method} {path} HTTP/1.1\nHost: selfheal.test\n"
            f"Content-Type: {content_type}\nTransfer-Encoding: chunked\n",
            *chunked(limit + 1),
        )
    assert_too_large(status, answer, limit)


async def test_the_plugin_api_keeps_its_own_limit(
    client: Any, settings: Settings, admin: Persona
) -> None:
    """The plugin API's limit (SELFHEAL_MAX_BODY_BYTES) is the tightest: a body the ops API
    takes is refused there before its signature is even looked at."""
    body = b"x" * (settings.max_body_bytes + 1)
    answer = await client.post(
        "/api/plugins/heartbeat", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "payload_too_large"
    ack = await client.post("/api/plugins/commands/x/ack", content=body)
    assert ack.status_code == 413

    # The same size is fine for the ops API: a large whitelist (~190 KiB) is saved.
    tenants = [f"merchant-{n:06d}" for n in range(12_000)]
    put = await client.put(
        "/api/ops/policy", json={"autopatch_whitelist": tenants}, headers=admin.auth
    )
    assert put.status_code == 200, put.text
    assert len(put.json()["autopatch_whitelist"]) == 12_000


async def test_the_ops_api_refuses_a_body_over_its_limit_even_with_a_token(
    client: Any, settings: Settings, admin: Persona
) -> None:
    body = b"[" + b" " * settings.ops_max_body_bytes + b"]"
    answer = await client.put(
        "/api/ops/policy",
        content=body,
        headers={**admin.auth, "Content-Type": "application/json"},
    )
    assert_too_large(answer.status_code, answer.content, settings.ops_max_body_bytes)


async def test_the_limits_are_settings(
    settings: Settings, database_url: str, admin: Persona
) -> None:
    tight = settings.model_copy(update={"ops_max_body_bytes": 2048})
    async with serve(tight) as (_, client):
        answer = await client.put(
            "/api/ops/policy",
            json={"autopatch_whitelist": [f"t-{n:05d}" for n in range(300)]},
            headers=admin.auth,
        )
    assert_too_large(answer.status_code, answer.content, 2048)


@pytest.mark.parametrize(
    "path",
    ["/api/ops/plugin-incidents", "/api/ops/autopatch-attempts", "/api/ops/maintenance-windows"],
)
async def test_paging_limits_are_capped(client: Any, viewer: Persona, path: str) -> None:
    answer = await client.get(path, params={"limit": 10**9}, headers=viewer.auth)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["field"] == "limit"
    assert "less than or equal to 500" in error["message"]
