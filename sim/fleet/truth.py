"""The truth table: what each version of the simulated plugin really does, hidden from the
control plane. The control plane only sees telemetry; the staging runner sees the part of it
that staging can know (`staging_truth`, written to its truth file).

- A version fixes the problem kinds its release lists under `fixes`, and everything the
  scenario's earlier releases (in version order) fix: fixes accumulate.
- A version has the problems its own release lists under `introduces` (they do not carry
  over to later versions).
- `passes_staging` says whether the staging runner passes it (default: yes; a bad release
  usually passes staging, which is what makes it dangerous)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin_client.versions import version_key
from sim.fleet.scenario import (
    DEFAULT_ERROR_RATE,
    DEFAULT_WEBHOOK_FAILURE_RATE,
    PROBLEM_KINDS,
    Scenario,
)

# Which problem kinds an incident type stands for.
INCIDENT_KINDS: dict[str, frozenset[str]] = {
    "webhook_fail_rate": frozenset({"webhook_failures"}),
    "error_spike": frozenset({"error_spike"}),
    "crash_loop": frozenset({"crash_loop"}),
    "heartbeat_missed": frozenset({"silence"}),
    "regression": frozenset(PROBLEM_KINDS),
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem an installation has, with its magnitude."""

    kind: str
    error_rate: float | None = None
    failure_rate: float | None = None


def problem(kind: str, params: dict[str, Any] | None = None) -> Problem:
    params = params or {}
    if kind == "error_spike":
        return Problem(kind, error_rate=float(params.get("error_rate") or DEFAULT_ERROR_RATE))
    if kind == "webhook_failures":
        return Problem(
            kind, failure_rate=float(params.get("failure_rate") or DEFAULT_WEBHOOK_FAILURE_RATE)
        )
    return Problem(kind)


class Truth:
    def __init__(self, scenario: Scenario) -> None:
        self.plugin = scenario.plugin
        self.initial_version = scenario.initial_version
        self._releases = {r.version: r for r in scenario.releases}
        ordered = sorted(scenario.releases, key=lambda r: version_key(r.version))
        self._fix_steps = [(version_key(r.version), frozenset(r.fixes)) for r in ordered]
        self._fixes_cache: dict[str, frozenset[str]] = {}

    @property
    def versions(self) -> list[str]:
        """The initial version and every release, oldest first."""
        return sorted({self.initial_version, *self._releases}, key=version_key)

    def fixes(self, version: str) -> frozenset[str]:
        cached = self._fixes_cache.get(version)
        if cached is None:
            key = version_key(version)
            fixed: set[str] = set()
            for step, kinds in self._fix_steps:
                if step <= key:
                    fixed |= kinds
            cached = self._fixes_cache[version] = frozenset(fixed)
        return cached

    def introduces(self, version: str) -> dict[str, Problem]:
        release = self._releases.get(version)
        if release is None:
            return {}
        return {
            kind: problem(kind, params.model_dump(exclude_none=True))
            for kind, params in release.introduces.items()
        }

    def is_bad(self, version: str) -> bool:
        return bool(self.introduces(version))

    def bad_versions(self) -> list[str]:
        return [v for v in self.versions if self.is_bad(v)]

    def passes_staging(self, version: str) -> bool:
        release = self._releases.get(version)
        return True if release is None else release.passes_staging

    def staging_truth(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The staging runner's truth file: {plugin: {version: {passes_staging, detail}}}."""
        entries: dict[str, dict[str, Any]] = {}
        for version, release in self._releases.items():
            if release.passes_staging:
                detail = release.detail or "passes staging (fleet simulator truth)"
            else:
                detail = release.detail or "fails staging (fleet simulator truth)"
            entries[version] = {"passes_staging": release.passes_staging, "detail": detail}
        return {self.plugin: entries}

    def describe(self) -> dict[str, Any]:
        """The table, for the report."""
        return {
            version: {
                "fixes": sorted(self.fixes(version)),
                "introduces": sorted(self.introduces(version)),
                "passes_staging": self.passes_staging(version),
            }
            for version in self.versions
        }


def write_json_atomically(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """A reader (the staging runner re-reads its truth file on every run) sees the old file or
    the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=sort_keys)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
