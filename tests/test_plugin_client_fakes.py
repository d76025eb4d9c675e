"""Test doubles for the plugin_client tests (no tests here): a fake control plane served by
uvicorn on loopback, a release signer with a real Ed25519 key, and archive builders.

The fake control plane checks every request signature independently of plugin_client (plain
hmac), validates heartbeats with the real server schema (app/plugins/schemas.py: strict types,
unknown fields refused), signs its 200 answers (or deliberately does not), hands out scripted
commands, serves artifacts, and records acks and fails."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import socket
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.plugins.schemas import Heartbeat

PLUGIN = "erp_crm"
SECRET = "test-secret-Zk3u9-0123456789abcdef"
FAR_FUTURE = "2099-01-01T00:00:00Z"


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


@dataclass
class FakeControlPlane:
    plugin_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    secret: str = SECRET
    # What the next heartbeats get: "ok", "503", "401" or "500".
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

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.port = _free_port()
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
        if signing == "signed":
            headers["X-Signature"] = "v1=" + sign_message(
                self.secret, str(stamp), "200", path, body
            )
        elif signing == "bad":
            headers["X-Signature"] = "v1=" + sign_message(
                "not-the-secret", str(stamp), "200", path, body
            )
        elif signing == "stale":
            stamp -= 1000
            headers["X-Signature"] = "v1=" + sign_message(
                self.secret, str(stamp), "200", path, body
            )
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
        with self.cond:
            mode, signing = self.mode, self.signing
            status = {"ok": 200, "503": 503, "401": 401, "500": 500}[mode]
            commands: list[dict[str, Any]] = []
            if status == 200:
                commands = list(self.commands)
                if not self.redeliver:
                    self.commands.clear()
            self.exchanges.append(Exchange(json.loads(body), status, signing))
            self.cond.notify_all()
        if status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return JSONResponse({"error": {"code": mode}}, status, headers=headers)
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(cp: FakeControlPlane) -> Iterator[FakeControlPlane]:
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


# -- releases ------------------------------------------------------------------------------


def canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ReleaseSigner:
    """A release manager's key: signs statements the way `selfheal release add` does."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    @property
    def public_b64(self) -> str:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()

    def sign(self, statement: str) -> str:
        return base64.b64encode(self.key.sign(statement.encode())).decode()

    def payload(
        self,
        data: bytes,
        *,
        version: str,
        artifact_url: str,
        plugin: str = PLUGIN,
        expires_at: str = FAR_FUTURE,
    ) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        statement = canonical(
            {
                "v": 1,
                "plugin": plugin,
                "version": version,
                "sha256": sha256,
                "expires_at": expires_at,
            }
        )
        return {
            "version": version,
            "artifact_url": artifact_url,
            "sha256": sha256,
            "signature": self.sign(statement),
            "signed": statement,
        }


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


# -- archives ------------------------------------------------------------------------------


def plugin_files(version: str, *, marker: str = "") -> dict[str, bytes]:
    return {
        "plugin.yaml": (
            f'name: "{PLUGIN}"\nversion: "{version}"\nentry_point: "src.main:Plugin"\n'
        ).encode(),
        "src/main.py": f"VERSION = {version!r}\nMARKER = {marker!r}\n".encode(),
    }


def tar_gz(files: dict[str, bytes], *, top: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in members:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def release_folder(root: Path, version: str) -> Path:
    """A FolderUpdater root holding `version` as current (what an installer leaves)."""
    folder = root / "versions" / version
    for name, data in plugin_files(version).items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "current").symlink_to(f"versions/{version}")
    return folder


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
