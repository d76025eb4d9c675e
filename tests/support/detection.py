"""Detection driven by hand: one tick, and heartbeats whose telemetry a threshold rule reads."""

from __future__ import annotations

from app.core.db import create_engine, create_sessionmaker
from app.incidents.detection import detect_once
from tests.support.plugins import heartbeat_body, send_heartbeat


async def tick(settings):
    engine = create_engine(settings, role="test")
    try:
        return await detect_once(create_sessionmaker(engine), settings)
    finally:
        await engine.dispose()


_uptime = iter(range(10_000, 10**9, 100))


async def beat(client, plugin, *, version="1.2.2", uptime=None, **telemetry):
    body = {
        "requests": 1000,
        "errors": 5,
        "webhook_attempts": 50,
        "webhook_failures": 0,
        **telemetry,
    }
    response = await send_heartbeat(
        client,
        plugin,
        heartbeat_body(
            plugin_version=version,
            uptime_s=next(_uptime) if uptime is None else uptime,
            telemetry=body,
        ),
    )
    assert response.status_code == 200, response.text
