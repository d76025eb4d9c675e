"""What really happened to each simulated installation: its faults and its versions, in wall
clock seconds (the control plane's timestamps are wall clock too, on the same machine). The
report joins this with what the control plane recorded."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from sim.fleet.truth import Problem, Truth, problem

Origin = Literal["scenario", "selfheal"]
Cause = Literal["initial", "update", "rollback", "deploy"]


@dataclass(slots=True)
class FaultRecord:
    """One fault on one installation.

    Kinds error_spike / webhook_failures / crash_loop / silence are active from `start` until
    `end` (None: no end planned), except while the installation runs a version that fixes
    them. A bad_release is active from `start` while the installation runs `version`, i.e.
    until its version changes; `origin` says who installed that version: the installation's
    operator (scenario) or the control plane (selfheal, a patch to a bad release)."""

    id: int
    installation_id: str
    kind: str
    start: float
    end: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    origin: Origin = "scenario"

    def as_json(self, t0: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "installation_id": self.installation_id,
            "kind": self.kind,
            "origin": self.origin,
            "start_s": round(self.start - t0, 3),
            "planned_end_s": None if self.end is None else round(self.end - t0, 3),
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class VersionChange:
    at: float
    version: str
    cause: Cause


@dataclass(slots=True)
class InstallationTruth:
    installation_id: str
    tenant_id: str
    faults: list[FaultRecord] = field(default_factory=list)
    versions: list[VersionChange] = field(default_factory=list)

    # -- versions -----------------------------------------------------------------------------

    def version_at(self, t: float) -> str:
        times = [change.at for change in self.versions]
        index = bisect.bisect_right(times, t) - 1
        return self.versions[max(index, 0)].version

    def segments(self, horizon: float) -> list[tuple[float, float, str]]:
        """(from, to, version) for each stretch on one version, up to `horizon`."""
        out = []
        for index, change in enumerate(self.versions):
            end = self.versions[index + 1].at if index + 1 < len(self.versions) else math.inf
            start = -math.inf if index == 0 else change.at
            if start < horizon:
                out.append((start, min(end, horizon), change.version))
        return out

    # -- faults -------------------------------------------------------------------------------

    def intervals(
        self, fault: FaultRecord, truth: Truth, horizon: float
    ) -> list[tuple[float, float]]:
        """When `fault` was really active, up to `horizon`."""
        if fault.kind == "bad_release":
            if fault.version is None or not truth.is_bad(fault.version):
                return []
            later = [c.at for c in self.versions if c.at > fault.start]
            end = min(later[0] if later else horizon, horizon)
            return [(fault.start, end)] if end > fault.start else []
        end = min(fault.end if fault.end is not None else horizon, horizon)
        if end <= fault.start:
            return []
        if fault.kind == "silence":
            return [(fault.start, end)]
        out: list[tuple[float, float]] = []
        for a, b, version in self.segments(horizon):
            lo, hi = max(a, fault.start), min(b, end)
            if hi <= lo or fault.kind in truth.fixes(version):
                continue
            if out and out[-1][1] >= lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def kinds(self, fault: FaultRecord, truth: Truth) -> frozenset[str]:
        """The problem kinds `fault` causes."""
        if fault.kind == "bad_release":
            return frozenset(truth.introduces(fault.version or ""))
        return frozenset({fault.kind})

    def active_between(self, a: float, b: float, truth: Truth, horizon: float) -> list[FaultRecord]:
        """Faults active at some moment of [a, b]."""
        found = []
        for fault in self.faults:
            if fault.start > b:
                continue
            if any(lo <= b and hi >= a for lo, hi in self.intervals(fault, truth, horizon)):
                found.append(fault)
        return found

    def problems_at(self, t: float, truth: Truth) -> dict[str, Problem]:
        """The problems the installation has at `t` (silence included), by kind."""
        version = self.version_at(t)
        found: dict[str, Problem] = dict(truth.introduces(version))
        fixed = truth.fixes(version)
        for fault in self.faults:
            if fault.kind == "bad_release" or fault.start > t:
                continue
            if fault.end is not None and t >= fault.end:
                continue
            if fault.kind != "silence" and fault.kind in fixed:
                continue
            found[fault.kind] = problem(fault.kind, fault.params)
        return found
