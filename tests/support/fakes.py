"""Fake peers that tests talk to over loopback.

- FakeControlPlane: the control plane as plugin_client sees it, served by uvicorn in a thread.
  It checks every request signature independently of plugin_client (plain hmac), validates
  heartbeats with the real server schema (app/plugins/schemas.py: strict types, unknown fields
  refused), signs its 200 answers (or deliberately does not), hands out scripted commands
  (`command`), serves artifacts, and records acks and fails. `agent_options` are the arguments
  of an agent of its installation.
- Receiver: a webhook receiver (a raw asyncio server) that records every request and answers
  as told."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.plugins.schemas import Heartbeat
from tests.support.artifacts import PLUGIN, ReleaseSigner
from tests.support.ports import free_port

SECRET = "test-secret-Zk3u9-0123456789abcdef"


def sign_message(secret: str, timestamp: str, middle: str, path: str, body: bytes) -> str:
    message = f"{timestamp}.{middle}.{path}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@dataclass
class Exchange:
    """One heartbeat as the fake control plane saw and answered it."""

    body: dict[str, Any]
    status: int
    signing: str


@dataclass
class Reported:
    command_id: str
    action: str
    body: dict[str, Any]


class _BrokenAnswer(Response):
    """Announces 1000 bytes, sends 10, and ends: the server closes the connection and the
    client sees the answer cut off (httpx: RemoteProtocolError)."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"server_t', "more_body": False})


@dataclass
class FakeControlPlane:
    plugin_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    secret: str = SECRET
    # What the next heartbeats get: "ok", "503", "401", "500", or "lost": stored, then the
    # connection breaks in the middle of the answer.
    mode: str = "ok"
    # How 200 answers are signed: "signed", "unsigned", "bad" (another secret), "stale".
    signing: str = "signed"
    retry_after: str | None = None
    next_heartbeat_s: float = 3600
    report_status: int = 200
    redeliver: bool = False
    commands: list[dict[str, Any]] = field(default_factory=list)
    artifacts: dict[tuple[str, str], bytes] = field(default_factory=dict)
    mirror: dict[str, bytes] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    reports: list[Reported] = field(default_factory=list)
    artifact_headers: list[dict[str, str]] = field(default_factory=list)
    mirror_headers: list[dict[str, str]] = field(default_factory=list)
    auth_failures: list[str] = field(default_factory=list)
    rejected_bodies: list[str] = field(default_factory=list)
    stored_messages: set[tuple[str, bytes]] = field(default_factory=set)
    replays: int = 0  # copies of stored heartbeats, answered 401 replay

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.port = free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(
            routes=[
                Route("/api/plugins/heartbeat", self._heartbeat, methods=["POST"]),
                Route(
                    "/api/plugins/commands/{command_id}/{action}", self._report, methods=["POST"]
                ),
                Route(
                    "/api/plugins/releases/{plugin}/{version}/artifact",
                    self._artifact,
                    methods=["GET"],
                ),
                Route("/mirror/{name}", self._mirror, methods=["GET"]),
            ]
        )

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(
            self.app,
            log_level="error",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive(), "the fake control plane did not start"
            assert time.monotonic() < deadline, "the fake control plane did not start in 30 s"
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)
            assert not self._thread.is_alive(), "the fake control plane did not stop"
        self._server = None

    # -- scripting and reading -----------------------------------------------------------

    def queue(self, *commands: dict[str, Any]) -> None:
        with self.cond:
            self.commands.extend(commands)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def reports_for(self, command_id: str, action: str | None = None) -> list[Reported]:
        with self.cond:
            return [
                r
                for r in self.reports
                if r.command_id == command_id and (action is None or r.action == action)
            ]

    def fail_reason(self, command_id: str) -> str:
        fails = self.reports_for(command_id, "fail")
        assert fails, f"no fail reported for {command_id}; reports: {self.reports}"
        return str(fails[-1].body["error"])

    def accepted(self) -> list[dict[str, Any]]:
        """Heartbeat bodies answered with a properly signed 200."""
        with self.cond:
            return [e.body for e in self.exchanges if e.status == 200 and e.signing == "signed"]

    def stored(self) -> list[dict[str, Any]]:
        """Heartbeat bodies stored: every one answered 200, however the answer was signed
        (the real control plane stores before it answers), each signed message once."""
        with self.cond:
            return [e.body for e in self.exchanges if e.status == 200]

    # -- routes --------------------------------------------------------------------------

    def _check(self, request: Request, body: bytes) -> str | None:
        headers = request.headers
        timestamp = headers.get("x-timestamp", "")
        if headers.get("x-plugin-id") != self.plugin_id:
            return "unknown plugin id"
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            return "bad timestamp"
        expected = sign_message(self.secret, timestamp, request.method, request.url.path, body)
        if headers.get("x-signature") != "v1=" + expected:
            return "bad signature"
        return None

    def _refuse(self, problem: str) -> Response:
        with self.cond:
            self.auth_failures.append(problem)
            self.cond.notify_all()
        return JSONResponse({"error": {"code": "unauthorized", "message": problem}}, 401)

    def _signed(self, status: int, path: str, body: bytes, signing: str) -> Response:
        headers = {}
        stamp = int(time.time())
        code = str(status)
        if signing == "signed":
            headers["X-Signature"] = "v1=" + sign_message(self.secret, str(stamp), code, path, body)
        elif signing == "bad":
            headers["X-Signature"] = "v1=" + sign_message(
                "not-the-secret", str(stamp), code, path, body
            )
        elif signing == "stale":
            stamp -= 1000
            headers["X-Signature"] = "v1=" + sign_message(self.secret, str(stamp), code, path, body)
        if signing != "unsigned":
            headers["X-Timestamp"] = str(stamp)
        return Response(body, status, headers=headers, media_type="application/json")

    async def _heartbeat(self, request: Request) -> Response:
        body = await request.body()
        problem = self._check(request, body)
        if problem:
            return self._refuse(problem)
        try:
            Heartbeat.model_validate_json(body)
        except ValidationError as exc:
            with self.cond:
                self.rejected_bodies.append(str(exc))
                self.cond.notify_all()
            return JSONResponse({"error": {"code": "validation_error"}}, 422)
        # The real control plane's replay guard: a copy of a stored heartbeat (same signed
        # message) gets a signed 401 `replay` and is not stored again.
        message = (request.headers["x-timestamp"], body)
        with self.cond:
            replay = message in self.stored_messages
            if replay:
                self.replays += 1
                self.cond.notify_all()
        if replay:
            signed = f"{message[0]}.POST.{request.url.path}.".encode() + body
            named = hashlib.sha256(signed).hexdigest()
            answer = json.dumps(
                {"error": {"code": "replay", "message": "already received", "request": named}},
                separators=(",", ":"),
            ).encode()
            return self._signed(401, request.url.path, answer, self.signing)
        with self.cond:
            mode, signing = self.mode, self.signing
            status = {"ok": 200, "lost": 200, "503": 503, "401": 401, "500": 500}[mode]
            commands: list[dict[str, Any]] = []
            if status == 200:
                self.stored_messages.add(message)
                commands = list(self.commands)
                if not self.redeliver:
                    self.commands.clear()
            self.exchanges.append(Exchange(json.loads(body), status, signing))
            self.cond.notify_all()
        if status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return JSONResponse({"error": {"code": mode}}, status, headers=headers)
        if mode == "lost":
            return _BrokenAnswer()
        answer = json.dumps(
            {
                "server_time": datetime.now(UTC).isoformat(),
                "next_heartbeat_s": self.next_heartbeat_s,
                "commands": commands,
            }
        ).encode()
        return self._signed(200, request.url.path, answer, signing)

    async def _report(self, request: Request) -> Response:
        body = await request.body()
        problem = self._check(request, body)
        if problem:
            return self._refuse(problem)
        action = request.path_params["action"]
        if action not in ("ack", "fail"):
            return JSONResponse({"error": "not found"}, 404)
        parsed = json.loads(body)
        expected_keys = {"result"} if action == "ack" else {"error", "retryable"}
        assert set(parsed) == expected_keys, parsed
        with self.cond:
            self.reports.append(Reported(request.path_params["command_id"], action, parsed))
            self.cond.notify_all()
            status = self.report_status
        return JSONResponse({"status": "acked" if action == "ack" else "failed"}, status)

    async def _artifact(self, request: Request) -> Response:
        problem = self._check(request, await request.body())
        if problem:
            return self._refuse(problem)
        key = (request.path_params["plugin"], request.path_params["version"])
        with self.cond:
            self.artifact_headers.append(dict(request.headers))
            data = self.artifacts.get(key)
        if data is None:
            return JSONResponse({"error": "no such release"}, 404)
        return Response(data, 200, media_type="application/octet-stream")

    async def _mirror(self, request: Request) -> Response:
        with self.cond:
            self.mirror_headers.append(dict(request.headers))
            data = self.mirror.get(request.path_params["name"])
        if data is None:
            return JSONResponse({"error": "not found"}, 404)
        return Response(data, 200, media_type="application/octet-stream")


@contextmanager
def running(cp: FakeControlPlane) -> Iterator[FakeControlPlane]:
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def command(
    command_type: str,
    payload: Any,
    *,
    command_id: str | None = None,
    expires_in_s: float = 3600,
) -> dict[str, Any]:
    return {
        "id": command_id or str(uuid.uuid4()),
        "type": command_type,
        "payload": payload,
        "expires_at": (datetime.now(UTC) + timedelta(seconds=expires_in_s)).isoformat(),
    }


def agent_options(
    cp: FakeControlPlane, signer: ReleaseSigner, tmp_path: Path, **overrides: Any
) -> dict[str, Any]:
    """The arguments of an agent of the fake control plane's installation, on 1.2.2, pinning
    `signer`'s key, with its state under `tmp_path`."""
    options: dict[str, Any] = {
        "base_url": cp.url,
        "plugin_id": cp.plugin_id,
        "secret": cp.secret,
        "plugin": PLUGIN,
        "version": "1.2.2",
        "public_keys": [signer.public_b64],
        "state_dir": tmp_path / "state",
    }
    options.update(overrides)
    return options


# -- a webhook receiver ---------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = orjson.loads(self.body)
        return data


@dataclass
class Receiver:
    """HTTP/1.1 on loopback, one request per connection. Each path answers 200 unless told
    otherwise: `answer(path, 500, 500)` queues answers, `always[path] = 400` fixes one,
    `delay_s[path]` holds the answer back."""

    requests: list[Received] = field(default_factory=list)
    plans: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    always: dict[str, int] = field(default_factory=dict)
    delay_s: dict[str, float] = field(default_factory=dict)
    port: int = 0
    server: asyncio.Server | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer(self, path: str, *statuses: int, headers: dict[str, str] | None = None) -> None:
        self.plans.setdefault(path, []).extend((status, headers or {}) for status in statuses)

    def to(self, path: str) -> list[Received]:
        return [request for request in self.requests if request.path == path]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await reader.readline()
            if not request_line:
                return
            _, path, _ = request_line.decode().split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Received(path, headers, body, time.time()))
            if self.delay_s.get(path):
                await asyncio.sleep(self.delay_s[path])
            plan = self.plans.get(path)
            status, extra = plan.pop(0) if plan else (self.always.get(path, 200), {})
            reply = b"ok" if status < 300 else f"error {status} from receiver".encode()
            head = f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(reply)}\r\n"
            head += "Content-Type: text/plain\r\nConnection: close\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            writer.write(head.encode() + b"\r\n" + reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
