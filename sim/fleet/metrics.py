"""The simulator's figures: what the control plane recorded (incidents, attempts, releases,
read from PostgreSQL by the caller into the plain rows below) joined with what really
happened (sim/fleet/timeline.py). Pure functions, so they can be tested on synthetic data.

How each figure is measured is in docs/simulator.md ("The report")."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

from sim.fleet.timeline import FaultRecord, InstallationTruth
from sim.fleet.truth import INCIDENT_KINDS, Truth

CLOSED_STATUSES = frozenset({"resolved", "rolled_back", "failed", "cancelled", "ignored"})
HEALED_STATUSES = frozenset({"resolved", "rolled_back"})
FINISHED_ATTEMPTS = frozenset({"success", "failed", "rolled_back"})
IN_FLIGHT_ATTEMPTS = frozenset({"pending", "staging", "applying", "verifying"})
Verdict = Literal["true", "mismatched", "false"]


@dataclass(frozen=True, slots=True)
class IncidentRow:
    id: str
    installation_id: str | None  # None: a fleet incident
    tenant_id: str | None
    type: str
    severity: str
    status: str
    detected_at: float
    resolved_at: float | None = None
    first_bad_signal_at: float | None = None
    status_reason: str | None = None
    decision_source: str | None = None  # sira | fallback | None (not decided)
    decision_action: str | None = None
    fallback_reason: str | None = None

    @property
    def open(self) -> bool:
        return self.status not in CLOSED_STATUSES


@dataclass(frozen=True, slots=True)
class AttemptRow:
    id: str
    incident_id: str | None
    installation_id: str | None
    action: str
    from_version: str | None
    to_version: str | None
    status: str
    automatic: bool
    created_at: float
    finished_at: float | None = None
    decision_source: str | None = None
    failure_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ReleaseState:
    version: str
    quarantined: bool
    quarantine_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Classified:
    incident: IncidentRow
    verdict: Verdict
    fault: FaultRecord | None  # the fault it stands for (or, when mismatched, the one active)
    # A true incident detected after its fault was already gone (an echo of older telemetry,
    # e.g. a rule looking back over samples from before the fix).
    stale: bool = False


# --- statistics ------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); `ordered` sorted, not
    empty."""
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def percentiles(values: Iterable[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None, "max": None, "count": 0}
    return {
        "p50": round(percentile(ordered, 0.5), 3),
        "p95": round(percentile(ordered, 0.95), 3),
        "max": round(ordered[-1], 3),
        "count": len(ordered),
    }


# --- incidents against the truth -------------------------------------------------------------


def classify(
    incidents: Iterable[IncidentRow],
    records: dict[str, InstallationTruth],
    truth: Truth,
    *,
    interval_s: float,
    horizon: float,
) -> list[Classified]:
    """Each installation incident of the run, judged by the truth at detection time.

    A heartbeat carries the traffic since the previous one, so a fault counts as active at
    detection if it was active at some moment of [first bad signal - 1.5 intervals - 2 s,
    detected_at]. "true": a fault of a kind the incident's type stands for was active;
    "mismatched": some other fault was; "false": none was."""
    out = []
    for incident in incidents:
        if incident.installation_id is None:
            continue
        record = records.get(incident.installation_id)
        if record is None:
            continue
        d = incident.detected_at
        signal = incident.first_bad_signal_at if incident.first_bad_signal_at is not None else d
        lag = 1.5 * interval_s + 2.0
        active = record.active_between(min(signal, d) - lag, d, truth, horizon)
        wanted = INCIDENT_KINDS.get(incident.type, frozenset())
        matching = [f for f in active if record.kinds(f, truth) & wanted]
        if matching:
            fault = max(matching, key=lambda f: f.start)
            now_active = record.active_between(d, d, truth, horizon)
            stale = not any(f.id == fault.id for f in now_active)
            out.append(Classified(incident, "true", fault, stale))
        elif active:
            out.append(Classified(incident, "mismatched", max(active, key=lambda f: f.start)))
        else:
            out.append(Classified(incident, "false", None))
    return out


def healthy_at_close(
    item: Classified, records: dict[str, InstallationTruth], truth: Truth, horizon: float
) -> bool:
    """The incident closed (resolved / rolled_back) with the problem it stands for gone."""
    incident = item.incident
    if incident.status not in HEALED_STATUSES or incident.resolved_at is None:
        return False
    assert incident.installation_id is not None
    record = records[incident.installation_id]
    wanted = INCIDENT_KINDS.get(incident.type, frozenset())
    at = incident.resolved_at
    still = [
        f for f in record.active_between(at, at, truth, horizon) if record.kinds(f, truth) & wanted
    ]
    return not still


def fault_label(fault: FaultRecord) -> str:
    if fault.kind == "bad_release" and fault.origin == "selfheal":
        return "bad_release_applied_by_selfheal"
    return fault.kind


def fault_end(
    record: InstallationTruth, fault: FaultRecord, truth: Truth, horizon: float
) -> tuple[str, float | None]:
    """How `fault` ended: healed (a command changed the version away from the problem),
    expired (its planned end came), still_open (active at `horizon`) or never_active."""
    spans = record.intervals(fault, truth, horizon)
    if not spans:
        return "never_active", None
    last_end = spans[-1][1]
    if last_end >= horizon:
        return "still_open", None
    if fault.kind != "bad_release" and fault.end is not None and last_end >= fault.end - 1e-6:
        return "expired", last_end
    return "healed", last_end


def oscillations(
    records: Iterable[InstallationTruth], t0: float, horizon: float
) -> list[dict[str, Any]]:
    """Installations whose version went back to one they were rolled back from, or that
    flipped between patch and rollback more than once for one fault (commands from the
    fault's start to the next fault's start on that installation, or the end)."""
    found = []
    for record in records:
        commands = [
            (change.at, change.cause, before.version, change.version)
            for before, change in pairwise(record.versions)
            if change.cause in ("update", "rollback")
        ]
        reasons = []
        rolled_back_from: dict[str, float] = {}
        for at, cause, old, new in commands:
            if cause == "rollback":
                rolled_back_from.setdefault(old, at)
            elif new in rolled_back_from:
                reasons.append(
                    f"updated to {new} at {at - t0:.1f} s after being rolled back from it at"
                    f" {rolled_back_from[new] - t0:.1f} s"
                )
        starts = sorted(f.start for f in record.faults)
        for fault in record.faults:
            later = [s for s in starts if s > fault.start]
            until = later[0] if later else horizon
            causes = [cause for at, cause, _, _ in commands if fault.start <= at < until]
            flips = sum(1 for a, b in pairwise(causes) if a != b)
            if flips > 1:
                reasons.append(
                    f"{flips} patch/rollback flips for the {fault_label(fault)} fault started at"
                    f" {fault.start - t0:.1f} s ({' -> '.join(causes)})"
                )
        if reasons:
            found.append(
                {
                    "installation_id": record.installation_id,
                    "tenant_id": record.tenant_id,
                    "reasons": reasons,
                    "versions": [
                        {"at_s": round(c.at - t0, 3), "version": c.version, "cause": c.cause}
                        for c in record.versions
                    ],
                }
            )
    return found


# --- the report ------------------------------------------------------------------------------


@dataclass
class ReportInputs:
    run: dict[str, Any]  # run_id, scenario, scenario_file, seed, mode, url, ...
    t0: float
    horizon: float  # when the outcomes were read: faults still active then are "still open"
    installations: int
    tenants: int
    interval_s: float
    duration_s: float
    truth: Truth
    records: list[InstallationTruth]
    incidents: list[IncidentRow]
    fleet_incidents: list[IncidentRow]
    attempts: list[AttemptRow]
    releases: list[ReleaseState]
    policy: dict[str, Any]
    decision_service: dict[str, Any]
    heartbeats: dict[str, int]
    commands: dict[str, int]
    refusal_reasons: dict[str, int]
    injections: list[dict[str, Any]]
    drain: dict[str, Any]
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)


def build_report(data: ReportInputs) -> dict[str, Any]:
    records = {r.installation_id: r for r in data.records}
    truth, t0, horizon = data.truth, data.t0, data.horizon
    judged = classify(data.incidents, records, truth, interval_s=data.interval_s, horizon=horizon)
    true_ones = [c for c in judged if c.verdict == "true"]

    # MTTD: fault start -> the first incident standing for it.
    first_detection: dict[int, float] = {}
    for item in true_ones:
        assert item.fault is not None
        at = item.incident.detected_at
        first_detection[item.fault.id] = min(first_detection.get(item.fault.id, at), at)
    all_faults = [f for r in data.records for f in r.faults]
    by_id = {f.id: f for f in all_faults}
    mttd_by_kind: dict[str, list[float]] = defaultdict(list)
    for fault_id, at in first_detection.items():
        fault = by_id[fault_id]
        mttd_by_kind[fault_label(fault)].append(max(0.0, at - fault.start))

    # MTTR: detected_at -> closed (resolved / rolled_back) with the problem gone.
    mttr_by_kind: dict[str, list[float]] = defaultdict(list)
    closed_unhealthy = []
    for item in true_ones:
        incident = item.incident
        if item.stale or incident.status not in HEALED_STATUSES or incident.resolved_at is None:
            continue
        assert item.fault is not None
        if healthy_at_close(item, records, truth, horizon):
            mttr_by_kind[fault_label(item.fault)].append(
                incident.resolved_at - incident.detected_at
            )
        else:
            closed_unhealthy.append(_incident_json(incident, t0))

    # Faults: injected, detected, healed, expired, still open.
    faults: dict[str, Counter[str]] = defaultdict(Counter)
    for record in data.records:
        for fault in record.faults:
            label = fault_label(fault)
            faults[label]["injected"] += 1
            faults[label]["detected"] += fault.id in first_detection
            outcome, _ = fault_end(record, fault, truth, horizon)
            faults[label][outcome] += 1
    for injection in data.injections:
        if injection["kind"] == "decision_service_down":
            faults["decision_service_down"]["injected"] += 1
            faults["decision_service_down"]["skipped"] += bool(injection.get("note"))
        elif injection["wanted"] > injection["got"]:
            faults[injection["kind"]]["not_placed"] += injection["wanted"] - injection["got"]

    attempts = [a for a in data.attempts if a.automatic]
    finished = [a for a in attempts if a.status in FINISHED_ATTEMPTS]
    outcome_counts = Counter(a.status for a in finished)

    false_items = [c for c in judged if c.verdict == "false"]
    stale_items = [c for c in true_ones if c.stale]
    mismatched = [c for c in judged if c.verdict == "mismatched"]
    found_oscillations = oscillations(data.records, t0, horizon)
    statuses = Counter(i.status for i in data.incidents if i.installation_id is not None)
    kinds = sorted(set(mttd_by_kind) | set(mttr_by_kind) | set(faults))
    sources = Counter(i.decision_source or "undecided" for i in data.incidents)
    fallback_reasons = Counter(
        i.fallback_reason
        for i in data.incidents
        if i.decision_source == "fallback" and i.fallback_reason
    )
    return {
        **data.run,
        "interrupted": data.interrupted,
        "installations": data.installations,
        "tenants": data.tenants,
        "interval_s": data.interval_s,
        "duration_s": data.duration_s,
        "drain": data.drain,
        "incidents": len([i for i in data.incidents if i.installation_id is not None]),
        "incidents_by_status": dict(sorted(statuses.items())),
        "incidents_by_type": dict(sorted(Counter(i.type for i in data.incidents).items())),
        "incidents_open_at_end": sum(1 for i in data.incidents if i.open),
        "fleet_incidents": len(data.fleet_incidents),
        "false_incidents": len(false_items),
        "false_incident_details": [_incident_json(c.incident, t0) for c in false_items],
        "stale_incidents": len(stale_items),
        "stale_incident_details": [
            {**_incident_json(c.incident, t0), "fault": _fault_json(c.fault, t0)}
            for c in stale_items
        ],
        "mismatched_incidents": len(mismatched),
        "mismatched_incident_details": [
            {**_incident_json(c.incident, t0), "active_fault": _fault_json(c.fault, t0)}
            for c in mismatched
        ],
        "oscillations": len(found_oscillations),
        "oscillation_details": found_oscillations,
        "mttd_s": percentiles(v for values in mttd_by_kind.values() for v in values),
        "mttr_s": percentiles(v for values in mttr_by_kind.values() for v in values),
        "by_fault_kind": {
            kind: {
                "mttd_s": percentiles(mttd_by_kind.get(kind, [])),
                "mttr_s": percentiles(mttr_by_kind.get(kind, [])),
            }
            for kind in kinds
        },
        "closed_unhealthy": len(closed_unhealthy),
        "closed_unhealthy_details": closed_unhealthy,
        "autopatch_success_rate": _rate(outcome_counts["success"], len(finished)),
        "rollback_rate": _rate(outcome_counts["rolled_back"], len(finished)),
        "attempts": {
            "automatic": len(attempts),
            "manual": len(data.attempts) - len(attempts),
            "finished": len(finished),
            "by_status": dict(sorted(Counter(a.status for a in data.attempts).items())),
            "by_action": dict(sorted(Counter(a.action for a in data.attempts).items())),
        },
        "commands_refused": data.commands.get("refused", 0),
        "commands": data.commands,
        "refusal_reasons": data.refusal_reasons,
        "faults": {kind: dict(sorted(counts.items())) for kind, counts in sorted(faults.items())},
        "bad_releases": _bad_releases(data, records),
        "policy": data.policy,
        "decision_service": {
            **data.decision_service,
            "decisions": dict(sorted(sources.items())),
            "fallback_reasons": dict(fallback_reasons),
        },
        "heartbeats": data.heartbeats,
        "truth": truth.describe(),
        "injections": data.injections,
        "notes": data.notes,
    }


def _bad_releases(data: ReportInputs, records: dict[str, InstallationTruth]) -> dict[str, Any]:
    states = {r.version: r for r in data.releases}
    out = {}
    for version in data.truth.bad_versions():
        deployed = applied = left_by_rollback = left_by_update = still = 0
        for record in records.values():
            touched = False
            for before, change in pairwise(record.versions):
                if change.version == version and change.cause == "deploy":
                    deployed += 1
                    touched = True
                elif change.version == version and change.cause == "update":
                    applied += 1
                    touched = True
                if before.version == version and change.cause == "rollback":
                    left_by_rollback += 1
                elif before.version == version and change.cause == "update":
                    left_by_update += 1
            if touched and record.versions[-1].version == version:
                still += 1
        state = states.get(version)
        out[version] = {
            "introduces": sorted(data.truth.introduces(version)),
            "deployed_by_operators": deployed,
            "applied_by_selfheal": applied,
            "rolled_back_from": left_by_rollback,
            "patched_away_from": left_by_update,
            "still_running_at_end": still,
            "quarantined": bool(state and state.quarantined),
            "quarantine_reason": state.quarantine_reason if state else None,
        }
    return out


def _rate(part: int, whole: int) -> float | None:
    return None if whole == 0 else round(part / whole, 4)


def _incident_json(incident: IncidentRow, t0: float) -> dict[str, Any]:
    return {
        "id": incident.id,
        "installation_id": incident.installation_id,
        "tenant_id": incident.tenant_id,
        "type": incident.type,
        "severity": incident.severity,
        "status": incident.status,
        "status_reason": incident.status_reason,
        "detected_at_s": round(incident.detected_at - t0, 3),
        "resolved_at_s": None
        if incident.resolved_at is None
        else round(incident.resolved_at - t0, 3),
    }


def _fault_json(fault: FaultRecord | None, t0: float) -> dict[str, Any] | None:
    return None if fault is None else fault.as_json(t0)


# --- live figures (the progress view) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveFigures:
    total: int
    by_status: dict[str, int]
    resolved: int
    rolled_back: int
    escalated: int
    open: int
    false: int
    mttd: dict[str, float | int | None]
    mttr: dict[str, float | int | None]


def live_figures(
    incidents: list[IncidentRow],
    records: list[InstallationTruth],
    truth: Truth,
    *,
    interval_s: float,
    now: float,
) -> LiveFigures:
    by_record = {r.installation_id: r for r in records}
    own = [i for i in incidents if i.installation_id is not None]
    judged = classify(own, by_record, truth, interval_s=interval_s, horizon=now)
    first: dict[int, tuple[float, float]] = {}
    mttr = []
    for item in judged:
        if item.verdict != "true" or item.fault is None:
            continue
        at = item.incident.detected_at
        known = first.get(item.fault.id)
        if known is None or at < known[0]:
            first[item.fault.id] = (at, item.fault.start)
        if (
            not item.stale
            and item.incident.resolved_at is not None
            and healthy_at_close(item, by_record, truth, now)
        ):
            mttr.append(item.incident.resolved_at - at)
    statuses = Counter(i.status for i in own)
    return LiveFigures(
        total=len(own),
        by_status=dict(statuses),
        resolved=statuses["resolved"],
        rolled_back=statuses["rolled_back"],
        escalated=statuses["escalated"],
        open=sum(1 for i in own if i.open),
        false=sum(1 for c in judged if c.verdict == "false"),
        mttd=percentiles(max(0.0, at - start) for at, start in first.values()),
        mttr=percentiles(mttr),
    )
