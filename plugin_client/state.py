"""What the client remembers across restarts, in `state_dir` (one directory per installation):

    commands.json   the command journal: id -> started | done (+ the ack/fail it produced)
    outbox.json     acks and fails that could not be delivered yet
    versions.json   versions this installation has run, with the sha256 of their artifact
    downloads/      artifacts being downloaded or handed to on_update (deleted afterwards)

Every file is replaced atomically (temp file, fsync, os.replace, fsync of the directory), so a
crash leaves either the old or the new content, never half a file. With no state_dir the
same records live in memory only: at-most-once then holds for the life of the process."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("plugin_client")

FORMAT = 1
JOURNAL_KEEP_IDS = 1000
JOURNAL_KEEP_S = 7 * 86400
OUTBOX_MAX = 1000
OUTBOX_KEEP_S = 7 * 86400
VERSIONS_KEEP = 50

CommandState = Literal["started", "done"]
Action = Literal["ack", "fail"]


@dataclass(frozen=True, slots=True)
class Report:
    """An ack or a fail for one command, as sent to the control plane."""

    command_id: str
    action: Action
    body: dict[str, Any]
    queued_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.command_id,
            "action": self.action,
            "body": self.body,
            "queued_at": self.queued_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Report | None:
        if not isinstance(data, dict):
            return None
        command_id, action, body = data.get("id"), data.get("action"), data.get("body")
        queued_at = data.get("queued_at", 0.0)
        if (
            not isinstance(command_id, str)
            or action not in ("ack", "fail")
            or not isinstance(body, dict)
            or not isinstance(queued_at, int | float)
        ):
            return None
        return cls(command_id, "ack" if action == "ack" else "fail", body, float(queued_at))


@dataclass(frozen=True, slots=True)
class CommandRecord:
    state: CommandState
    type: str
    at: float
    report: Report | None = None


@dataclass(frozen=True, slots=True)
class VersionRecord:
    sha256: str | None
    first_run_at: float
    last_run_at: float


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash at any point leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """The journal, the outbox and the version record. Thread-safe; each change that matters
    for at-most-once is on disk before the method returns."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._lock = threading.RLock()
        self._memory_downloads: Path | None = None
        self._commands: dict[str, CommandRecord] = {}
        self._outbox: dict[str, Report] = {}
        self._versions: dict[str, VersionRecord] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._commands = self._load_commands()
            self._outbox = self._load_outbox()
            self._versions = self._load_versions()

    # -- files ---------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / name

    def _read(self, name: str) -> dict[str, Any]:
        path = self._path(name)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Atomic writes make this unlikely (a disk error, a hand edit). Keep the file for
            # a human and carry on: a host that cannot start is worse than a lost record.
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.error("selfheal state file %s is unreadable (%s); moved to %s", path, exc, aside)
            return {}
        if not isinstance(data, dict):
            log.error("selfheal state file %s does not hold an object; ignoring it", path)
            return {}
        return data

    def _write(self, name: str, data: dict[str, Any]) -> None:
        if self.directory is None:
            return
        payload = json.dumps({"format": FORMAT, **data}, sort_keys=True, indent=1)
        write_atomic(self._path(name), payload.encode("utf-8"))

    def _load_commands(self) -> dict[str, CommandRecord]:
        records: dict[str, CommandRecord] = {}
        raw = self._read("commands.json").get("commands", {})
        if not isinstance(raw, dict):
            return records
        for command_id, entry in raw.items():
            if not isinstance(entry, dict) or entry.get("state") not in ("started", "done"):
                continue
            at = entry.get("at")
            report = Report.from_json(entry.get("report")) if entry.get("report") else None
            records[command_id] = CommandRecord(
                state="done" if entry["state"] == "done" else "started",
                type=str(entry.get("type", "")),
                at=float(at) if isinstance(at, int | float) else time.time(),
                report=report,
            )
        return records

    def _load_outbox(self) -> dict[str, Report]:
        raw = self._read("outbox.json").get("reports", [])
        reports: dict[str, Report] = {}
        if isinstance(raw, list):
            for item in raw:
                report = Report.from_json(item)
                if report is not None:
                    reports[report.command_id] = report
        return reports

    def _load_versions(self) -> dict[str, VersionRecord]:
        raw = self._read("versions.json").get("versions", {})
        versions: dict[str, VersionRecord] = {}
        if not isinstance(raw, dict):
            return versions
        for version, entry in raw.items():
            if not isinstance(entry, dict):
                continue
            sha256 = entry.get("sha256")
            first, last = entry.get("first_run_at"), entry.get("last_run_at")
            versions[version] = VersionRecord(
                sha256=sha256 if isinstance(sha256, str) else None,
                first_run_at=float(first) if isinstance(first, int | float) else 0.0,
                last_run_at=float(last) if isinstance(last, int | float) else 0.0,
            )
        return versions

    def _save_commands(self) -> None:
        now = time.time()
        newest = sorted(self._commands.items(), key=lambda item: item[1].at, reverse=True)
        self._commands = {
            command_id: record
            for index, (command_id, record) in enumerate(newest)
            if index < JOURNAL_KEEP_IDS or now - record.at < JOURNAL_KEEP_S
        }
        self._write(
            "commands.json",
            {
                "commands": {
                    command_id: {
                        "state": record.state,
                        "type": record.type,
                        "at": record.at,
                        "report": record.report.to_json() if record.report else None,
                    }
                    for command_id, record in self._commands.items()
                }
            },
        )

    def _save_outbox(self) -> None:
        now = time.time()
        fresh = [r for r in self._outbox.values() if now - r.queued_at < OUTBOX_KEEP_S]
        fresh.sort(key=lambda report: report.queued_at)
        self._outbox = {report.command_id: report for report in fresh[-OUTBOX_MAX:]}
        self._write("outbox.json", {"reports": [r.to_json() for r in self._outbox.values()]})

    def _save_versions(self) -> None:
        newest = sorted(self._versions.items(), key=lambda item: item[1].last_run_at)
        self._versions = dict(newest[-VERSIONS_KEEP:])
        self._write(
            "versions.json",
            {
                "versions": {
                    version: {
                        "sha256": record.sha256,
                        "first_run_at": record.first_run_at,
                        "last_run_at": record.last_run_at,
                    }
                    for version, record in self._versions.items()
                }
            },
        )

    # -- the command journal -------------------------------------------------------------

    def command(self, command_id: str) -> CommandRecord | None:
        with self._lock:
            return self._commands.get(command_id)

    def mark_started(self, command_id: str, command_type: str) -> None:
        """Durably: this command is about to reach its handler. Once this returns, the
        command never runs again, whatever happens to the process."""
        with self._lock:
            self._commands[command_id] = CommandRecord("started", command_type, time.time())
            self._save_commands()

    def mark_done(self, command_id: str, command_type: str, report: Report) -> None:
        with self._lock:
            self._commands[command_id] = CommandRecord("done", command_type, time.time(), report)
            self._save_commands()

    # -- the outbox ----------------------------------------------------------------------

    def pending_reports(self) -> list[Report]:
        with self._lock:
            return sorted(self._outbox.values(), key=lambda report: report.queued_at)

    def queue_report(self, report: Report) -> None:
        with self._lock:
            self._outbox[report.command_id] = report
            self._save_outbox()

    def report_delivered(self, command_id: str) -> None:
        with self._lock:
            if self._outbox.pop(command_id, None) is not None:
                self._save_outbox()

    # -- versions ------------------------------------------------------------------------

    def version(self, version: str) -> VersionRecord | None:
        with self._lock:
            return self._versions.get(version)

    def versions(self) -> dict[str, VersionRecord]:
        with self._lock:
            return dict(self._versions)

    def record_version(self, version: str, sha256: str | None) -> None:
        """`version` runs now. A sha256 already known is kept unless a new one is given."""
        with self._lock:
            now = time.time()
            known = self._versions.get(version)
            self._versions[version] = VersionRecord(
                sha256=sha256 if sha256 is not None else (known.sha256 if known else None),
                first_run_at=known.first_run_at if known else now,
                last_run_at=now,
            )
            self._save_versions()

    # -- downloads -----------------------------------------------------------------------

    def download_dir(self) -> Path:
        with self._lock:
            if self.directory is not None:
                folder = self.directory / "downloads"
                folder.mkdir(exist_ok=True, mode=0o700)
                return folder
            if self._memory_downloads is None or not self._memory_downloads.exists():
                self._memory_downloads = Path(tempfile.mkdtemp(prefix="selfheal-downloads-"))
            return self._memory_downloads
