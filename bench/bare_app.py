"""The baseline for bench/heartbeats.py: a bare FastAPI endpoint that only reads the heartbeat
body and validates it with the same pydantic model as selfheal. No signature check, no
database, no middleware: what any FastAPI service on this machine pays per request.

    uvicorn bench.bare_app:app --workers 2 --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import Response

from app.plugins.schemas import Heartbeat

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/api/plugins/heartbeat")
async def heartbeat(request: Request) -> Response:
    body = await request.body()
    try:
        Heartbeat.model_validate_json(body)
    except ValidationError as exc:
        return Response(
            b'{"error": "validation_error", "detail": '
            + exc.json(include_url=False).encode()
            + b"}",
            status_code=422,
            media_type="application/json",
        )
    return Response(
        orjson.dumps(
            {"server_time": datetime.now(UTC).isoformat(), "next_heartbeat_s": 120, "commands": []}
        ),
        media_type="application/json",
    )


@app.get("/health")
async def health() -> Response:
    return Response(b'{"status": "ok"}', media_type="application/json")
