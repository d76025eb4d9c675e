"""Heartbeats are answered before FastAPI's stack (app/plugins/fastpath.py, SelfhealAPI), or,
when chunked, through the whole stack: either way they get what every request gets from
RequestContextMiddleware (request id, latency histogram under the route template) and the
same answers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from tests.support.plugins import HEARTBEAT, Plugin, heartbeat_body, send_heartbeat
from tests.test_health_metrics import sample


def _count(text: str, status: str) -> float:
    return (
        sample(
            text,
            "selfheal_http_request_duration_seconds_count",
            method="POST",
            route=HEARTBEAT,
            status=status,
        )
        or 0.0
    )


async def test_a_heartbeat_carries_a_request_id_and_is_timed_under_its_route(
    client: Any, plugin: Plugin
) -> None:
    before = (await client.get("/metrics")).text
    accepted = await send_heartbeat(client, plugin)
    assert accepted.status_code == 200, accepted.text
    assert re.fullmatch(r"[0-9a-f]{32}", accepted.headers["x-request-id"])
    # A header of the plugin's own is echoed, cut to 64 characters.
    body = heartbeat_body(uptime_s=5)
    headers = {**plugin.headers(body, HEARTBEAT), "X-Request-ID": "hb-trace-1"}
    echoed = await client.post(HEARTBEAT, content=body, headers=headers)
    assert echoed.status_code == 200, echoed.text
    assert echoed.headers["x-request-id"] == "hb-trace-1"
    body = heartbeat_body(uptime_s=7)
    headers = {**plugin.headers(body, HEARTBEAT), "X-Request-ID": "r" * 100}
    long_id = await client.post(HEARTBEAT, content=body, headers=headers)
    assert long_id.headers["x-request-id"] == "r" * 64

    refused = await client.post(
        HEARTBEAT,
        content=body,
        headers={**plugin.headers(body, HEARTBEAT), "X-Signature": "v1=" + "0" * 64},
    )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "bad_signature"
    assert re.fullmatch(r"[0-9a-f]{32}", refused.headers["x-request-id"])

    after = (await client.get("/metrics")).text
    assert _count(after, "200") - _count(before, "200") == 3
    assert _count(after, "401") - _count(before, "401") == 1


async def test_a_chunked_heartbeat_is_served_through_the_whole_stack(
    client: Any, plugin: Plugin
) -> None:
    body = heartbeat_body(uptime_s=11)
    headers = plugin.headers(body, HEARTBEAT)

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:]

    answer = await client.post(HEARTBEAT, content=chunks(), headers=headers)
    assert answer.status_code == 200, answer.text
    assert "x-signature" in answer.headers
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    # The same signed message again is a replay, whichever path it takes.
    replay = await client.post(HEARTBEAT, content=body, headers=headers)
    assert replay.status_code == 401
    assert replay.json()["error"]["code"] == "replay"
