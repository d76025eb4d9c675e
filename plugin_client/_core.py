"""What Agent and AsyncAgent share: configuration, the heartbeat body, the reading of answers,
every check a command passes before it reaches a handler, and the schedule. No network here:
the two agents do the I/O, each in its own style, and ask this core what to do with it."""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from plugin_client.errors import CommandRefused, HeartbeatFailed, UpdateFailed
from plugin_client.signing import (
    parse_public_keys,
    request_digest,
    response_problem,
    sign_request,
    verify_release,
)
from plugin_client.state import Report, StateStore
from plugin_client.telemetry import Counters, EarlyReport, Snapshot
from plugin_client.versions import is_newer, is_valid_version

log = logging.getLogger("plugin_client")

USER_AGENT = "selfheal-plugin-client/0.1"
HEARTBEAT_PATH = "/api/plugins/heartbeat"
DEFAULT_INTERVAL_S = 120.0
DEFAULT_MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 86_400.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
MAX_RETRY_AFTER_S = 3_600.0
MAX_ERROR_CHARS = 4000
# A heartbeat whose fate is unknown (no answer, cancelled, a 5xx, an answer that does not
# verify) or that was refused for a while only (429) is sent again as the same signed bytes
# while it is this fresh, on the control plane's clock as last seen: the control plane stores
# it once, and answers a copy of a stored one with a signed 401 `replay` naming it, which tells
# us it arrived. The server refuses a timestamp more than 300 s off; past this age a new
# heartbeat carries the counts instead.
RESEND_WITHIN_S = 240.0
_MAX_UPTIME_S = 10 * 365 * 86_400
_COMMAND_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ENV_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RELEASE_FIELDS = ("artifact_url", "sha256", "signature", "signed")
KNOWN_TYPES = ("update", "rollback", "config")

# Said once per process: a simulator runs thousands of agents configured alike.
_warned: set[str] = set()


class Updater(Protocol):
    """What `agent.use()` takes: a FolderUpdater, or anything with these three methods."""

    def on_update(self, version: str, artifact: Path) -> None: ...

    def on_rollback(self, version: str) -> None: ...

    def holds(self, version: str, sha256: str | None) -> bool: ...


@dataclass(slots=True)
class AgentStats:
    """What the agent has done so far (read-only copies: `agent.stats`)."""

    heartbeats_sent: int = 0  # accepted (verified 200, or signed 401 replay of this one)
    heartbeats_failed: int = 0  # tries not accepted (network, non-200, unsigned 200)
    heartbeats_resent: int = 0  # sent again as the same signed bytes (see RESEND_WITHIN_S)
    commands_applied: int = 0  # handler ran and returned
    commands_refused: int = 0  # a check failed: the handler was never called
    commands_failed: int = 0  # the handler raised
    last_refusal_reason: str | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A signed request, ready to send."""

    method: str
    url: str
    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class SentHeartbeat:
    """A signed heartbeat and the counts it carries."""

    request: Prepared
    snapshot: Snapshot
    signed_at: float  # its X-Timestamp (unix seconds)
    digest: str  # request_digest: what a signed 401 replay of it names


@dataclass(frozen=True, slots=True)
class Command:
    id: str
    type: str
    payload: Any
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class UpdatePlan:
    command: Command
    version: str
    url: str
    sha256: str
    signed_download: bool  # same origin as the control plane: a signed plugin request


@dataclass(frozen=True, slots=True)
class RollbackPlan:
    command: Command
    version: str
    sha256: str | None


@dataclass(frozen=True, slots=True)
class ConfigPlan:
    command: Command
    values: dict[str, Any]


Plan = UpdatePlan | RollbackPlan | ConfigPlan


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not run: send `fail` with `reason`. `record`: remember the outcome in the journal so
    a redelivery gets the same answer (not for transient or response-level problems)."""

    command_id: str
    command_type: str
    reason: str
    retryable: bool = False
    record: bool = True


@dataclass(frozen=True, slots=True)
class Resend:
    """Already done: send its ack or fail again."""

    report: Report


Decision = Plan | Refuse | Resend


@dataclass(slots=True)
class HeartbeatOutcome:
    body: dict[str, Any] | None = None
    commands: list[Any] = field(default_factory=list)
    server_now: datetime | None = None
    refusals: list[Refuse] = field(default_factory=list)
    error: HeartbeatFailed | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    base_url: str
    plugin_id: str
    secret: str
    plugin: str
    version: str
    public_keys: tuple[str, ...]
    state_dir: Path | None
    env: str


def _from_env(value: str | None, argument: str, variable: str, *, required: bool) -> str | None:
    if value is None:
        value = os.environ.get(variable) or None
    if value is None and required:
        raise ValueError(
            f"plugin_client: {argument} is required: pass {argument}=... or set the"
            f" {variable} environment variable"
        )
    return value


def resolve_settings(
    *,
    base_url: str | None,
    plugin_id: str | None,
    secret: str | None,
    plugin: str | None,
    version: str | None,
    public_keys: Sequence[str] | str | None,
    state_dir: str | os.PathLike[str] | None,
    env: str,
) -> Settings:
    """Arguments first, the environment for what is missing; ValueError naming both."""
    url = _from_env(base_url, "base_url", "SELFHEAL_URL", required=True)
    installation = _from_env(plugin_id, "plugin_id", "SELFHEAL_PLUGIN_ID", required=True)
    key = _from_env(secret, "secret", "SELFHEAL_PLUGIN_SECRET", required=True)
    name = _from_env(plugin, "plugin", "SELFHEAL_PLUGIN_NAME", required=True)
    running = _from_env(version, "version", "SELFHEAL_PLUGIN_VERSION", required=True)
    assert url and installation and key and name and running
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError(f"plugin_client: base_url (SELFHEAL_URL) {url!r} is not an http(s) URL")
    if not is_valid_version(running):
        raise ValueError(
            f"plugin_client: version (SELFHEAL_PLUGIN_VERSION) {running!r} is not a version"
            " the control plane accepts (digits first, like 1.2.3 or 1.2.3-rc1)"
        )
    if not _ENV_NAME.match(env):
        raise ValueError(f"plugin_client: env {env!r} must match {_ENV_NAME.pattern}")
    if public_keys is None:
        public_keys = os.environ.get("SELFHEAL_PUBLIC_KEYS", "")
    if isinstance(public_keys, str):
        public_keys = [part for part in public_keys.split(",") if part.strip()]
    folder = state_dir if state_dir is not None else os.environ.get("SELFHEAL_STATE_DIR") or None
    return Settings(
        base_url=url.rstrip("/"),
        plugin_id=installation,
        secret=key,
        plugin=name,
        version=running,
        public_keys=tuple(k.strip() for k in public_keys),
        state_dir=Path(folder).expanduser() if folder is not None else None,
        env=env,
    )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:MAX_ERROR_CHARS]


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 to an aware datetime (naive means UTC); None when unreadable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class AgentCore:
    """State and decisions of one installation's agent."""

    def __init__(
        self,
        settings: Settings,
        *,
        uptime: Callable[[], float] | None,
        meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None,
        installed_artifact: str | os.PathLike[str] | None,
        installed_sha256: str | None,
        interval_s: float,
        max_artifact_bytes: int,
        rng: random.Random | None,
        early_report: EarlyReport | None = None,
    ) -> None:
        self.settings = settings
        self.keys: list[Ed25519PublicKey] = parse_public_keys(settings.public_keys)
        self.version = settings.version
        self.early_report = early_report
        # Set by the agent: wakes its loop for an early heartbeat (telemetry.EarlyReport).
        self.wake: Callable[[], None] | None = None
        self.last_beat_at = -math.inf  # time.monotonic() of the last heartbeat sent
        self.counters = Counters(early_report, on_alarm=self._alarm)
        self.state = StateStore(settings.state_dir)
        self.max_artifact_bytes = max_artifact_bytes
        self.next_heartbeat_s = _clamp_interval(interval_s)
        self.rng = rng or random.Random()
        self.beat_soon = False
        # The heartbeat in flight (sent anew or again).
        self._current: SentHeartbeat | None = None
        # The heartbeat whose fate is unknown, to send again as it is (RESEND_WITHIN_S): set
        # when one is built, cleared by a definite answer, so a try that is cancelled or
        # raises anything leaves it to be sent again.
        self._unanswered: SentHeartbeat | None = None
        # The control plane's clock minus ours, from the last verified answer.
        self._clock_offset_s = 0.0
        self._stats = AgentStats()
        self._stats_lock = threading.Lock()
        self._created = time.monotonic()
        self._uptime = uptime
        self._meta = meta
        self.handlers: dict[str, Callable[..., Any]] = {}
        self.holds: Callable[[str, str | None], bool] | None = None
        base_path = urlsplit(settings.base_url).path.rstrip("/")
        self.heartbeat_url = settings.base_url + HEARTBEAT_PATH
        self.heartbeat_path = base_path + HEARTBEAT_PATH
        if not self.keys:
            _warn_once(
                "plugin_client: no public key pinned (public_keys= or SELFHEAL_PUBLIC_KEYS):"
                " every update will be refused"
            )
        if settings.state_dir is None:
            _warn_once(
                "plugin_client: no state_dir (state_dir= or SELFHEAL_STATE_DIR): commands run"
                " at most once only for the life of this process"
            )
        sha256 = installed_sha256
        if sha256 is not None and not _SHA256.match(sha256):
            raise ValueError("plugin_client: installed_sha256 must be 64 lowercase hex digits")
        if installed_artifact is not None:
            sha256 = sha256_file(Path(installed_artifact))
        self.state.record_version(self.version, sha256)

    # -- stats ---------------------------------------------------------------------------

    @property
    def stats(self) -> AgentStats:
        with self._stats_lock:
            return replace(self._stats)

    def _count(self, **changes: int | str | None) -> None:
        with self._stats_lock:
            for name, value in changes.items():
                if isinstance(value, int) and name not in ("last_refusal_reason", "last_error"):
                    setattr(self._stats, name, getattr(self._stats, name) + value)
                else:
                    setattr(self._stats, name, value)

    # -- requests ------------------------------------------------------------------------

    def signed(self, method: str, url: str, body: bytes) -> Prepared:
        path = urlsplit(url).path
        headers = sign_request(self.settings.secret, method, path, body)
        headers["X-Plugin-Id"] = self.settings.plugin_id
        headers["User-Agent"] = USER_AGENT
        if method != "GET":
            headers["Content-Type"] = "application/json"
        return Prepared(method, url, path, body, headers)

    def uptime_s(self) -> int:
        if self._uptime is not None:
            value = self._uptime()
        else:
            value = time.monotonic() - self._created
        if not math.isfinite(value):
            return 0
        return int(min(max(value, 0), _MAX_UPTIME_S))

    def _alarm(self) -> None:
        if self.wake is not None:
            self.wake()

    def early_beat_at(self) -> float:
        """The earliest time.monotonic() an early heartbeat may go out."""
        spacing = self.early_report.min_spacing_s if self.early_report else 0.0
        return self.last_beat_at + spacing

    def heartbeat_request(self) -> tuple[Prepared, Snapshot]:
        """The heartbeat to send now: the last one again when its fate is unknown and it is
        fresh enough (RESEND_WITHIN_S), otherwise a new one with the counts so far."""
        self.last_beat_at = time.monotonic()
        again = self._unanswered
        if again is not None and (
            abs(time.time() + self._clock_offset_s - again.signed_at) < RESEND_WITHIN_S
        ):
            self._current = again
            self._count(heartbeats_resent=1)
            return again.request, again.snapshot
        snapshot = self.counters.snapshot()
        meta = self._meta() if callable(self._meta) else self._meta
        body = {
            "plugin_version": self.version,
            "env": self.settings.env,
            "uptime_s": self.uptime_s(),
            "sent_at": datetime.now(UTC).isoformat(),
            "telemetry": snapshot.telemetry(),
            "meta": dict(meta or {}),
        }
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        request = self.signed("POST", self.heartbeat_url, raw)
        stamp = request.headers["X-Timestamp"]
        self._current = self._unanswered = SentHeartbeat(
            request, snapshot, float(stamp), request_digest(stamp, "POST", request.path, raw)
        )
        return request, snapshot

    def heartbeat_result(
        self,
        status_code: int,
        headers: Mapping[str, str],
        body: bytes,
        snapshot: Snapshot,
    ) -> HeartbeatOutcome:
        """Read the answer to a heartbeat: deliver the counters when it is a verified 200, list
        the commands to check, or the failure (and the commands to refuse with it)."""
        if status_code != 200:
            if status_code == 401 and self._stored_before(headers, body):
                # This very heartbeat was stored before (a copy whose answer we never got, or
                # a proxy that sent it twice): delivered, with no answer of its own.
                self.counters.delivered(snapshot)
                self._count(heartbeats_sent=1)
                self._unanswered = None
                # What was counted meanwhile goes at once, and the answer brings the interval.
                self.beat_soon = True
                log.info("plugin_client: the heartbeat sent again had been stored the first time")
                return HeartbeatOutcome(body={})
            # 429 and 5xx: refused for now, or (a proxy's 502/504) maybe stored: it stays to be
            # sent again. Any other answer refused this request for good: the next one is new.
            if not (status_code == 429 or status_code >= 500):
                self._unanswered = None
            retry_after = parse_retry_after(headers.get("retry-after"))
            message = f"heartbeat answered {status_code}: {_snippet(body)}"
            self._count(heartbeats_failed=1, last_error=message)
            log.warning("plugin_client: %s", message)
            return HeartbeatOutcome(
                error=HeartbeatFailed(message, status_code=status_code, retry_after=retry_after)
            )
        problem = response_problem(
            self.settings.secret, status_code, self.heartbeat_path, body, headers
        )
        if problem is not None:
            # A forged or mangled 200 must neither run commands nor eat telemetry; it may have
            # been stored, so the same bytes go again (it stays in _unanswered).
            self._count(heartbeats_failed=1, last_error=problem)
            log.error("plugin_client: heartbeat answer refused: %s", problem)
            # Commands we know already (run, refused, or in flight) keep the answer they got.
            refusals = [
                Refuse(command_id, command_type, problem, record=False)
                for command_id, command_type in _readable_command_ids(body)
                if self.state.command(command_id) is None
            ]
            return HeartbeatOutcome(
                refusals=refusals,
                error=HeartbeatFailed(problem, status_code=status_code),
            )
        self.counters.delivered(snapshot)
        self._count(heartbeats_sent=1)
        self._unanswered = None
        with contextlib.suppress(ValueError, KeyError):
            self._clock_offset_s = int(headers["x-timestamp"]) - time.time()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            log.error(
                "plugin_client: the heartbeat answer is not a JSON object: %s", _snippet(body)
            )
            return HeartbeatOutcome(body={})
        interval = parsed.get("next_heartbeat_s")
        if isinstance(interval, int | float) and not isinstance(interval, bool):
            self.next_heartbeat_s = _clamp_interval(float(interval))
        commands = parsed.get("commands")
        if commands is None:
            commands = []
        if not isinstance(commands, list):
            log.error("plugin_client: the heartbeat answer's commands is not a list")
            commands = []
        return HeartbeatOutcome(
            body=parsed,
            commands=commands,
            server_now=parse_time(parsed.get("server_time")),
        )

    def _stored_before(self, headers: Mapping[str, str], body: bytes) -> bool:
        """A 401 `replay` answer, signed, naming the digest of the heartbeat in flight: that
        very request was stored before. Unsigned, or about another request, it proves
        nothing (error answers are not signed otherwise)."""
        current = self._current
        if current is None:
            return False
        try:
            error = json.loads(body)["error"]
            code, named = error["code"], error.get("request")
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        return (
            code == "replay"
            and isinstance(named, str)
            and hmac.compare_digest(named, current.digest)
            and response_problem(self.settings.secret, 401, self.heartbeat_path, body, headers)
            is None
        )

    def heartbeat_unreachable(self, exc: BaseException) -> HeartbeatFailed:
        # No answer: it may have been stored all the same, so the same bytes go again (it
        # stays in _unanswered).
        message = f"control plane unreachable: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        self._count(heartbeats_failed=1, last_error=message)
        log.warning("plugin_client: %s", message)
        return HeartbeatFailed(message)

    # -- reports (ack / fail) ------------------------------------------------------------

    def report_request(self, report: Report) -> Prepared:
        url = f"{self.settings.base_url}/api/plugins/commands/{report.command_id}/{report.action}"
        body = json.dumps(report.body, separators=(",", ":"), ensure_ascii=False).encode()
        return self.signed("POST", url, body)

    def report_answered(self, report: Report, status_code: int, body: bytes) -> bool:
        """True when the report needs no more sending."""
        if status_code == 200:
            return True
        if status_code == 409:
            log.info(
                "plugin_client: command %s was already final; %s not needed",
                report.command_id,
                report.action,
            )
            return True
        if status_code == 404:
            log.warning(
                "plugin_client: command %s is not ours (404) for %s: %s",
                report.command_id,
                report.action,
                _snippet(body),
            )
            return True
        if status_code in (401, 408, 425, 429) or status_code >= 500:
            log.warning(
                "plugin_client: %s of command %s answered %s; will retry: %s",
                report.action,
                report.command_id,
                status_code,
                _snippet(body),
            )
            return False
        # Another 4xx will not change by sending the same thing again.
        log.error(
            "plugin_client: %s of command %s refused with %s, dropping it: %s",
            report.action,
            report.command_id,
            status_code,
            _snippet(body),
        )
        return True

    def refusal_report(self, refusal: Refuse) -> Report:
        self._count(commands_refused=1, last_refusal_reason=refusal.reason)
        log.warning(
            "plugin_client: refused %s command %s: %s",
            refusal.command_type or "?",
            refusal.command_id,
            refusal.reason,
        )
        return fail_report(refusal.command_id, refusal.reason, retryable=refusal.retryable)

    # -- checks --------------------------------------------------------------------------

    def check_command(self, raw: Any, server_now: datetime | None) -> Decision | None:
        """Every check that can run before a download; None when the command cannot even be
        named (no id we could report against)."""
        if not isinstance(raw, dict):
            log.error("plugin_client: ignoring a command that is not an object: %r", raw)
            return None
        command_id = raw.get("id")
        if not isinstance(command_id, str) or not _COMMAND_ID.match(command_id):
            log.error("plugin_client: ignoring a command without a usable id: %r", command_id)
            return None
        command_type = raw.get("type")
        type_name = command_type if isinstance(command_type, str) else ""
        record = self.state.command(command_id)
        if record is not None and record.state == "done" and record.report is not None:
            return Resend(record.report)
        if record is not None:
            return Refuse(command_id, type_name, "interrupted while applying; state unknown")
        try:
            return self._plan(command_id, type_name, raw, server_now)
        except CommandRefused as exc:
            return Refuse(command_id, type_name, exc.reason, retryable=exc.retryable)

    def _plan(
        self, command_id: str, type_name: str, raw: dict[str, Any], server_now: datetime | None
    ) -> Plan:
        expires_raw = raw.get("expires_at")
        expires_at = parse_time(expires_raw)
        if expires_raw is not None and expires_at is None:
            raise CommandRefused(f"malformed command: expires_at {expires_raw!r} is not ISO-8601")
        if "type" not in raw or not isinstance(raw.get("type"), str):
            raise CommandRefused("malformed command: type is missing or not a string")
        now = server_now or datetime.now(UTC)
        if expires_at is not None and now >= expires_at:
            raise CommandRefused(f"command expired at {expires_at.isoformat()}")
        if type_name not in KNOWN_TYPES:
            raise CommandRefused(f"unknown command type {type_name!r}")
        if type_name not in self.handlers:
            raise CommandRefused(f"no on_{type_name} handler is registered in this plugin")
        command = Command(command_id, type_name, raw.get("payload"), expires_at)
        if not isinstance(command.payload, dict):
            raise CommandRefused("malformed payload: not a JSON object")
        if type_name == "update":
            return self._plan_update(command, command.payload)
        if type_name == "rollback":
            return self._plan_rollback(command, command.payload)
        values = command.payload.get("values")
        if not isinstance(values, dict):
            raise CommandRefused('malformed payload: a config payload is {"values": {...}}')
        return ConfigPlan(command, values)

    def _release_fields(self, payload: dict[str, Any], names: Sequence[str]) -> dict[str, str]:
        fields = {}
        for name in names:
            value = payload.get(name)
            if not isinstance(value, str) or not value:
                raise CommandRefused(
                    f"malformed payload: field {name!r} is missing, empty or not a string"
                )
            fields[name] = value
        if not is_valid_version(fields["version"]):
            raise CommandRefused(
                f"malformed payload: version {fields['version']!r} is not a valid version"
            )
        return fields

    def _plan_update(self, command: Command, payload: dict[str, Any]) -> UpdatePlan:
        fields = self._release_fields(payload, ("version", *_RELEASE_FIELDS))
        statement = verify_release(
            self.keys,
            version=fields["version"],
            sha256=fields["sha256"],
            signature=fields["signature"],
            signed=fields["signed"],
            plugin=self.settings.plugin,
        )
        if not is_newer(statement.version, self.version):
            raise CommandRefused(
                f"update to {statement.version} is not newer than the current version"
                f" {self.version} (an update never goes to a lower or the same version)"
            )
        url, signed_download = self.artifact_location(fields["artifact_url"])
        return UpdatePlan(command, statement.version, url, statement.sha256, signed_download)

    def _plan_rollback(self, command: Command, payload: dict[str, Any]) -> RollbackPlan:
        fields = self._release_fields(payload, ("version",))
        version = fields["version"]
        sha256: str | None = None
        if any(name in payload for name in _RELEASE_FIELDS):
            # A rollback that names a signed release is checked exactly like an update.
            release = self._release_fields(payload, ("version", "sha256", "signature", "signed"))
            statement = verify_release(
                self.keys,
                version=version,
                sha256=release["sha256"],
                signature=release["signature"],
                signed=release["signed"],
                plugin=self.settings.plugin,
            )
            sha256 = statement.sha256
        if version == self.version:
            raise CommandRefused(f"rollback to the current version {version}")
        known = self.state.version(version)
        if known is None:
            raise CommandRefused(f"rollback to version {version}, which this plugin never ran")
        if sha256 is not None and known.sha256 is not None and sha256 != known.sha256:
            raise CommandRefused(
                f"rollback to version {version}: the artifact this plugin ran has sha256"
                f" {known.sha256}, not the signed {sha256}"
            )
        held_sha = known.sha256 or sha256
        try:
            held = self.holds is None or self.holds(version, held_sha)
        except Exception as exc:
            raise CommandRefused(
                f"rollback to version {version}: cannot tell whether it is still held ({exc})"
            ) from None
        if not held:
            raise CommandRefused(
                f"rollback to version {version}, which this plugin no longer holds"
            )
        return RollbackPlan(command, version, held_sha)

    def artifact_location(self, artifact_url: str) -> tuple[str, bool]:
        """(absolute URL, same origin as the control plane). Only http(s); a path that starts
        with a single `/` (an artifact the control plane serves itself) is appended to
        base_url, as the control plane does when it knows its own address."""
        if artifact_url.startswith("/") and not artifact_url.startswith("//"):
            url = self.settings.base_url + artifact_url
        else:
            url = artifact_url
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise CommandRefused(f"artifact URL is not http(s): {artifact_url[:200]!r}")
        return url, _origin(url) == _origin(self.settings.base_url)

    # -- artifacts -----------------------------------------------------------------------

    def download_request(self, plan: UpdatePlan) -> Prepared:
        """Signed only on the control plane's own origin: never leak signatures elsewhere."""
        if plan.signed_download:
            return self.signed("GET", plan.url, b"")
        path = urlsplit(plan.url).path
        return Prepared("GET", plan.url, path, b"", {"User-Agent": USER_AGENT})

    def download_path(self, plan: UpdatePlan) -> Path:
        return self.state.download_dir() / f"{plan.command.id}.{uuid.uuid4().hex}.artifact"

    def too_large(self, size: int) -> CommandRefused:
        return CommandRefused(
            f"artifact is larger than the {self.max_artifact_bytes}-byte cap (max_artifact_bytes)"
            + (f": {size} bytes announced" if size else "")
        )

    def download_failed(self, status_code: int | None, detail: str) -> CommandRefused:
        retryable = status_code is None or status_code in (408, 429) or status_code >= 500
        where = f"HTTP {status_code}" if status_code is not None else "no answer"
        return CommandRefused(
            f"artifact download failed ({where}): {detail}"[:MAX_ERROR_CHARS], retryable=retryable
        )

    @staticmethod
    def check_artifact(plan: UpdatePlan, digest: str) -> None:
        if digest != plan.sha256:
            raise CommandRefused(
                f"artifact sha256 mismatch: downloaded {digest}, signed {plan.sha256}"
            )

    # -- outcomes ------------------------------------------------------------------------

    def handler_args(self, plan: Plan, artifact: Path | None) -> tuple[Any, ...]:
        if isinstance(plan, UpdatePlan):
            assert artifact is not None
            return (plan.version, artifact)
        if isinstance(plan, RollbackPlan):
            return (plan.version,)
        return (plan.values,)

    def applied(self, plan: Plan) -> Report:
        """The handler returned: the new state, recorded (file I/O), and the ack to send."""
        result: dict[str, Any]
        if isinstance(plan, UpdatePlan):
            self.state.record_version(plan.version, plan.sha256)
            self.version = plan.version
            result = {"version": plan.version, "sha256": plan.sha256}
        elif isinstance(plan, RollbackPlan):
            self.state.record_version(plan.version, None)
            self.version = plan.version
            result = {"version": plan.version}
        else:
            result = {"version": self.version, "config_keys": sorted(map(str, plan.values))}
        self._count(commands_applied=1)
        self.beat_soon = True
        log.info("plugin_client: applied %s command %s", plan.command.type, plan.command.id)
        report = Report(plan.command.id, "ack", {"result": result})
        self.state.mark_done(plan.command.id, plan.command.type, report)
        return report

    def handler_failed(self, plan: Plan, exc: Exception) -> Report:
        if isinstance(exc, CommandRefused):
            reason, retryable = exc.reason, exc.retryable
        else:
            reason, retryable = error_text(exc), False
        self._count(commands_failed=1, last_error=reason)
        log.error(
            "plugin_client: %s command %s failed in its handler: %s",
            plan.command.type,
            plan.command.id,
            reason,
            # Our own failures say everything in their message; anything else gets its trace.
            exc_info=None if isinstance(exc, CommandRefused | UpdateFailed) else exc,
        )
        report = fail_report(plan.command.id, reason, retryable=retryable)
        self.state.mark_done(plan.command.id, plan.command.type, report)
        return report

    # -- schedule ------------------------------------------------------------------------

    def next_delay(self) -> float:
        """After an accepted heartbeat: the server's interval, ±10% so a fleet spreads out."""
        return self.next_heartbeat_s * self.rng.uniform(0.9, 1.1)

    def backoff_delay(self, failures: int, retry_after: float | None) -> float:
        """After `failures` failed heartbeats in a row: full jitter over 1 s, 2 s, 4 s, ...,
        capped at the last next_heartbeat_s or 60 s, whichever is smaller; never sooner than
        the server's Retry-After."""
        cap = min(self.next_heartbeat_s, BACKOFF_MAX_S)
        bound = min(cap, BACKOFF_BASE_S * 2.0 ** min(failures - 1, 30))
        delay = self.rng.uniform(0.0, bound)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


def fail_report(command_id: str, reason: str, *, retryable: bool) -> Report:
    return Report(
        command_id, "fail", {"error": reason[:MAX_ERROR_CHARS] or "failed", "retryable": retryable}
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def remove_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _clamp_interval(value: float) -> float:
    if not math.isfinite(value):
        return DEFAULT_INTERVAL_S
    return min(max(value, MIN_INTERVAL_S), MAX_INTERVAL_S)


def _snippet(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace")


def _readable_command_ids(body: bytes) -> list[tuple[str, str]]:
    """Ids (and types) of the commands in an answer we will not trust, to report them."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    commands = parsed.get("commands") if isinstance(parsed, dict) else None
    found = []
    for item in commands if isinstance(commands, list) else []:
        if isinstance(item, dict):
            command_id, command_type = item.get("id"), item.get("type")
            if isinstance(command_id, str) and _COMMAND_ID.match(command_id):
                found.append((command_id, command_type if isinstance(command_type, str) else ""))
    return found
