"""Signed plugin requests: an installation registered with its secret, the headers that sign a
request as it, heartbeat bodies, and a heartbeat sent."""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.plugins.repository import insert_command
from app.plugins.service import register_installation
from app.plugins.signatures import sign

HEARTBEAT = "/api/plugins/heartbeat"


def signed_headers(
    plugin_id: str,
    secret: str,
    body: bytes,
    path: str,
    *,
    method: str = "POST",
    timestamp: int | None = None,
) -> dict[str, str]:
    """The headers of a request signed as installation `plugin_id` (now, unless `timestamp`)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "X-Plugin-Id": plugin_id,
        "X-Timestamp": ts,
        "X-Signature": sign(secret, ts, method, path, body),
        "Content-Type": "application/json",
    }


@dataclass
class Plugin:
    id: str
    secret: str
    tenant: str
    name: str

    def headers(
        self,
        body: bytes,
        path: str,
        *,
        method: str = "POST",
        timestamp: int | None = None,
        secret: str | None = None,
    ) -> dict[str, str]:
        return signed_headers(
            self.id, secret or self.secret, body, path, method=method, timestamp=timestamp
        )


async def register(
    settings: Settings,
    *,
    tenant: str = "merchant-1",
    name: str = "payments",
    version: str = "1.2.2",
) -> Plugin:
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            issued = await register_installation(
                session,
                SecretBox(settings.secret_key),
                tenant=tenant,
                name=name,
                version=version,
                env="prod",
            )
    finally:
        await engine.dispose()
    return Plugin(str(issued.plugin_id), issued.secret, tenant, name)


def heartbeat_body(**overrides: Any) -> bytes:
    body: dict[str, Any] = {
        "plugin_version": "1.2.2",
        "env": "prod",
        "uptime_s": 3600,
        "sent_at": "2026-11-23T12:00:00+00:00",
        "telemetry": {
            "requests": 1200,
            "errors": 3,
            "webhook_attempts": 50,
            "webhook_failures": 1,
            "latency_p95_ms": 120,
            "errors_last_24h": 42,
        },
        "meta": {},
    }
    body.update(overrides)
    return orjson.dumps(body)


_uptime = itertools.count(1000)


async def send_heartbeat(
    client: httpx.AsyncClient, plugin: Plugin, body: bytes | None = None, **header_options: Any
) -> httpx.Response:
    # A distinct uptime makes each default body a distinct signed message (not a replay).
    body = heartbeat_body(uptime_s=next(_uptime)) if body is None else body
    return await client.post(
        HEARTBEAT, content=body, headers=plugin.headers(body, HEARTBEAT, **header_options)
    )


async def queue_command(
    settings: Settings,
    plugin: Plugin,
    *,
    type: str,
    payload: dict[str, Any],
    ttl_s: int = 3600,
    max_deliveries: int = 5,
    automatic: bool = False,
) -> str:
    """Queue a command for `plugin` as the control plane does (the next heartbeat hands it
    out); its id."""
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            command_id = await insert_command(
                session,
                installation_id=uuid.UUID(plugin.id),
                type=type,
                payload=payload,
                ttl_s=ttl_s,
                max_deliveries=max_deliveries,
                automatic=automatic,
            )
    finally:
        await engine.dispose()
    return str(command_id)
