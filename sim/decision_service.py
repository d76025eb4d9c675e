"""A reference decision service ("SIRA", DESIGN.md "Decision service").

In "normal" mode it answers deterministically and sensibly:
- heartbeat_missed -> escalate (a silent installation has nothing we could patch);
- regression with a previous version -> rollback to it, confidence 0.9;
- webhook_fail_rate, error_spike, crash_loop with candidates -> patch to the highest
  candidate, confidence 0.87;
- anything else -> escalate.
Other modes misbehave on purpose, for tests; switch at run time with
`POST /_control {"mode": ...}`:
- "slow": sleeps `slow_s` (default 30 s, longer than any sane deadline), then answers;
- "error": HTTP 500;
- "garbage": HTTP 200 with a body that breaks every rule of the contract.
"Down" is the process not running.

Feedback is kept in memory: `POST /api/sira/feedback` stores, `GET` lists.

Run: `python -m sim.decision_service --port 8300 --token T [--mode normal]`."""

from __future__ import annotations

import argparse
import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sim.serving import bearer_guard, serve_from_command_line

Mode = Literal["normal", "slow", "error", "garbage"]
MODES: tuple[Mode, ...] = ("normal", "slow", "error", "garbage")
PATCHABLE_TYPES = frozenset({"webhook_fail_rate", "error_spike", "crash_loop"})


class Incident(BaseModel):
    id: str
    type: str
    severity: str
    tenant_id: str | None = None
    plugin: str
    current_version: str | None = None
    previous_version: str | None = None
    telemetry_snapshot: dict[str, Any] = Field(default_factory=dict)
    detected_at: str


class DecideRequest(BaseModel):
    incident: Incident
    candidates: list[str] = Field(default_factory=list)


class Answer(BaseModel):
    action: Literal["patch", "rollback", "ignore", "escalate"]
    patch_version: str | None
    confidence: float
    explanation: str


class Control(BaseModel):
    mode: Mode | None = None
    slow_s: float | None = Field(default=None, ge=0)


@dataclass
class SiraState:
    mode: Mode
    slow_s: float
    calls: Counter[str] = field(default_factory=Counter)
    feedback: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "slow_s": self.slow_s,
            "calls": dict(self.calls),
            "feedback_count": len(self.feedback),
        }


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Orders "1.10.0" after "1.9.2"; numeric parts before textual ones ("1.2.3" after
    "1.2.3-rc1" is not attempted: releases here are plain dotted numbers)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-+]", version)
    )


def decide_normally(request: DecideRequest) -> Answer:
    incident = request.incident
    offered = [v for v in request.candidates if v != incident.current_version]
    if incident.type == "heartbeat_missed":
        return Answer(
            action="escalate",
            patch_version=None,
            confidence=0.8,
            explanation="The installation is silent: nothing to patch until it reports again.",
        )
    if incident.type == "regression" and incident.previous_version:
        return Answer(
            action="rollback",
            patch_version=incident.previous_version,
            confidence=0.9,
            explanation=(
                f"The problem began after the update to {incident.current_version}; "
                f"{incident.previous_version} was healthy."
            ),
        )
    if incident.type in PATCHABLE_TYPES and offered:
        best = max(offered, key=version_key)
        return Answer(
            action="patch",
            patch_version=best,
            confidence=0.87,
            explanation=f"{best} is the newest release offered and addresses {incident.type}.",
        )
    return Answer(
        action="escalate",
        patch_version=None,
        confidence=0.5,
        explanation=f"No release to try for {incident.type}; a human should look.",
    )


GARBAGE = {
    "action": "reboot-the-datacenter",
    "patch_version": 42,
    "confidence": "very high",
    "explanation": None,
}


def _as_mode(value: str) -> Mode:
    for mode in MODES:
        if mode == value:
            return mode
    raise ValueError(f"mode must be one of {', '.join(MODES)}, not {value!r}")


def create_app(token: str, mode: str = "normal", *, slow_s: float = 30.0) -> FastAPI:
    state = SiraState(mode=_as_mode(mode), slow_s=slow_s)
    authorized = Depends(bearer_guard(token))
    app = FastAPI(title="reference decision service", docs_url=None, redoc_url=None)
    app.state.sira = state

    def counted(request: Request) -> None:
        state.calls[request.url.path] += 1

    seen = Depends(counted)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "mode": state.mode}

    @app.post("/api/sira/decide", dependencies=[seen, authorized], response_model=None)
    async def decide(body: DecideRequest) -> Answer | JSONResponse:
        if state.mode == "error":
            return JSONResponse({"detail": "simulated failure"}, status_code=500)
        if state.mode == "garbage":
            return JSONResponse(GARBAGE)
        if state.mode == "slow":
            await asyncio.sleep(state.slow_s)
        return decide_normally(body)

    @app.post("/api/sira/feedback", dependencies=[seen, authorized], status_code=202)
    async def store_feedback(body: dict[str, Any]) -> dict[str, int]:
        state.feedback.append(body)
        return {"stored": len(state.feedback)}

    @app.get("/api/sira/feedback", dependencies=[authorized])
    async def list_feedback() -> dict[str, list[dict[str, Any]]]:
        return {"items": state.feedback}

    @app.get("/_control", dependencies=[authorized])
    async def show_control() -> dict[str, Any]:
        return state.as_json()

    @app.post("/_control", dependencies=[authorized])
    async def control(body: Control) -> dict[str, Any]:
        if body.mode is not None:
            state.mode = body.mode
        if body.slow_s is not None:
            state.slow_s = body.slow_s
        return state.as_json()

    return app


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="normal")
    parser.add_argument("--slow-s", type=float, default=30.0)


def main(argv: list[str] | None = None) -> None:
    serve_from_command_line(
        "Reference decision service (SIRA) for selfheal tests and demos.",
        "SIRA_API_TOKEN",
        lambda args: create_app(args.token, args.mode, slow_s=args.slow_s),
        argv,
        _options,
    )


if __name__ == "__main__":
    main()
