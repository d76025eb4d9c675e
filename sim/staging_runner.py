"""A reference staging runner (DESIGN.md "Staging runner").

`POST /runs {"plugin", "from_version", "to_version", "artifact"}` starts a run and answers
`{"id", "status": "running", "report"}`; `GET /runs/{id}` reports "running" until `delay_s`
has passed, then "passed", or "failed" when to_version is in `fail_versions`. Both settings
are fixed per run when it starts, so changing them later does not rewrite a run under way.
Tests steer it with `POST /_control {"fail_versions": [...], "delay_s": 0.2, "mode": ...}`;
mode "error" answers every run request with HTTP 500, "normal" works as above.

Run: `python -m sim.staging_runner --port 8301 --token T`."""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sim.serving import bearer_guard, serve_from_command_line

RunnerMode = Literal["normal", "error"]


class RunRequest(BaseModel):
    plugin: str
    from_version: str | None = None
    to_version: str
    artifact: str


class Control(BaseModel):
    fail_versions: list[str] | None = None
    delay_s: float | None = Field(default=None, ge=0)
    mode: RunnerMode | None = None


@dataclass
class Run:
    id: str
    request: RunRequest
    started_at: float
    delay_s: float
    will_fail: bool

    def as_json(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "status": self.status(now), "report": self.report(now)}

    def status(self, now: float) -> str:
        if now - self.started_at < self.delay_s:
            return "running"
        return "failed" if self.will_fail else "passed"

    def report(self, now: float) -> dict[str, Any]:
        target = f"{self.request.plugin} {self.request.from_version} -> {self.request.to_version}"
        status = self.status(now)
        if status == "running":
            return {"summary": f"staging {target}", "checks": []}
        smoke: dict[str, Any] = {"name": "smoke", "passed": status == "passed"}
        if status == "failed":
            smoke["detail"] = "simulated failure"
        verdict = "all checks passed" if status == "passed" else "smoke tests failed"
        return {
            "summary": f"{target}: {verdict}",
            "checks": [{"name": "install", "passed": True}, smoke],
        }


@dataclass
class RunnerState:
    delay_s: float
    fail_versions: set[str] = field(default_factory=set)
    mode: RunnerMode = "normal"
    runs: dict[str, Run] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "delay_s": self.delay_s,
            "fail_versions": sorted(self.fail_versions),
            "mode": self.mode,
            "runs": len(self.runs),
        }


def create_app(token: str, *, delay_s: float = 0.2) -> FastAPI:
    state = RunnerState(delay_s=delay_s)
    authorized = Depends(bearer_guard(token))
    app = FastAPI(title="reference staging runner", docs_url=None, redoc_url=None)
    app.state.runner = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/runs", dependencies=[authorized], status_code=202, response_model=None)
    async def start_run(body: RunRequest) -> dict[str, Any] | JSONResponse:
        if state.mode == "error":
            return JSONResponse({"detail": "simulated failure"}, status_code=500)
        now = time.monotonic()
        run = Run(
            id=str(uuid.uuid4()),
            request=body,
            started_at=now,
            delay_s=state.delay_s,
            will_fail=body.to_version in state.fail_versions,
        )
        state.runs[run.id] = run
        return run.as_json(now)

    @app.get("/runs/{run_id}", dependencies=[authorized], response_model=None)
    async def show_run(run_id: str) -> dict[str, Any] | JSONResponse:
        if state.mode == "error":
            return JSONResponse({"detail": "simulated failure"}, status_code=500)
        run = state.runs.get(run_id)
        if run is None:
            raise HTTPException(status_code=404, detail="no such run")
        return run.as_json(time.monotonic())

    @app.get("/_control", dependencies=[authorized])
    async def show_control() -> dict[str, Any]:
        return state.as_json()

    @app.post("/_control", dependencies=[authorized])
    async def control(body: Control) -> dict[str, Any]:
        if body.fail_versions is not None:
            state.fail_versions = set(body.fail_versions)
        if body.delay_s is not None:
            state.delay_s = body.delay_s
        if body.mode is not None:
            state.mode = body.mode
        return state.as_json()

    return app


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--delay-s", type=float, default=0.2)


def main(argv: list[str] | None = None) -> None:
    serve_from_command_line(
        "Reference staging runner for selfheal tests and demos.",
        "STAGING_RUNNER_TOKEN",
        lambda args: create_app(args.token, delay_s=args.delay_s),
        argv,
        _options,
    )


if __name__ == "__main__":
    main()
