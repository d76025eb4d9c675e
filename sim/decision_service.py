"""A reference decision service ("SIRA", docs/contracts.md "Decision service") that learns from the
outcomes the control plane sends to /feedback.

It keeps a Beta posterior of success per (incident type, plugin, version, action): each
"success" adds one to alpha, each "failed" or "rolled_back" one to beta, and an attempt_id
counts once however often it is delivered. Priors: a patch to a release never tried is
optimistic but uncertain, Beta(8.7, 1.3) (mean 0.87); a rollback to the known-good version
starts at Beta(9, 1) (mean 0.9).

In "normal" mode:
- heartbeat_missed -> escalate (a silent installation has nothing we could patch);
- regression with a previous (known-good) version -> rollback to it, confidence = the
  posterior mean of that rollback; with regression_strategy "forward", patch to the best
  candidate newer than current_version instead when there is one;
- webhook_fail_rate, error_spike, crash_loop -> patch to the candidate newer than
  current_version with the best posterior mean (ties: the newest), confidence = that mean;
  candidates whose mean fell below 0.5 are skipped (they failed before); with none left, a
  rollback to previous_version when there is one, else escalate.
- anything else -> escalate.
The explanation gives the numbers behind the choice.

Other modes misbehave on purpose, for tests; switch at run time with
`POST /_control {"mode": ..., "slow_s": ..., "regression_strategy": ..., "reset": true}`:
- "slow": sleeps `slow_s` (default 30 s, longer than any sane deadline), then answers;
- "error": HTTP 500;
- "garbage": HTTP 200 with a body that breaks every rule of the contract.
"Down" is the process not running. `reset` forgets everything learned.

`GET /api/sira/posterior` shows the table; `--state-file` keeps it (and the feedback) across
restarts.

Run: `python -m sim decision-service --port 8300 --token T [--state-file F]`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import tempfile
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeGuard

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sim.serving import bearer_guard, serve_from_command_line

Mode = Literal["normal", "slow", "error", "garbage"]
MODES: tuple[Mode, ...] = ("normal", "slow", "error", "garbage")
Strategy = Literal["rollback", "forward"]
STRATEGIES: tuple[Strategy, ...] = ("rollback", "forward")
Action = Literal["patch", "rollback"]
PATCHABLE_TYPES = frozenset({"webhook_fail_rate", "error_spike", "crash_loop"})
PRIORS: dict[Action, tuple[float, float]] = {"patch": (8.7, 1.3), "rollback": (9.0, 1.0)}
SKIP_BELOW = 0.5
SUCCESS_OUTCOMES = frozenset({"success"})
FAILURE_OUTCOMES = frozenset({"failed", "rolled_back"})
MAX_FEEDBACK_KEPT = 10_000
MAX_ATTEMPTS_REMEMBERED = 100_000
MAX_DECISIONS_REMEMBERED = 10_000
STATE_FORMAT = 1
MAX_LISTED = 5  # candidates named in an explanation


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
    regression_strategy: Strategy | None = None
    reset: bool = False


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Orders "1.10.0" after "1.9.2"; numeric parts before textual ones ("1.2.3" after
    "1.2.3-rc1" is not attempted: releases here are plain dotted numbers)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-+]", version)
    )


# --- what was learned ------------------------------------------------------------------------

Key = tuple[str, str, str, Action]  # incident type, plugin, version, action


@dataclass
class Tally:
    successes: int = 0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Belief:
    """The posterior of one (incident type, plugin, version, action)."""

    incident_type: str
    version: str
    action: Action
    successes: int
    failures: int

    @property
    def alpha(self) -> float:
        return PRIORS[self.action][0] + self.successes

    @property
    def beta(self) -> float:
        return PRIORS[self.action][1] + self.failures

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def describe(self) -> str:
        """e.g. "1.2.4: 5 successes, 0 failures on webhook_fail_rate (posterior 0.93)"."""
        if self.successes == self.failures == 0:
            return f"{self.version}: never tried on {self.incident_type} (prior {self.mean:.2f})"
        return (
            f"{self.version}: {_count(self.successes, 'success', 'successes')},"
            f" {_count(self.failures, 'failure', 'failures')} on {self.incident_type}"
            f" (posterior {self.mean:.2f})"
        )


def _text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


@dataclass
class Knowledge:
    """The posterior table and the feedback it came from."""

    tallies: dict[Key, Tally] = field(default_factory=dict)
    feedback: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_FEEDBACK_KEPT))
    # attempt ids already counted (oldest forgotten first, far beyond any redelivery window)
    attempts: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # incident id -> (action, version) this service answered: tells a feedback's action
    decisions: OrderedDict[str, tuple[Action, str]] = field(default_factory=OrderedDict)

    def belief(self, incident_type: str, plugin: str, version: str, action: Action) -> Belief:
        tally = self.tallies.get((incident_type, plugin, version, action), Tally())
        return Belief(incident_type, version, action, tally.successes, tally.failures)

    def remember_decision(self, incident_id: str, action: Action, version: str) -> None:
        self.decisions[incident_id] = (action, version)
        self.decisions.move_to_end(incident_id)
        while len(self.decisions) > MAX_DECISIONS_REMEMBERED:
            self.decisions.popitem(last=False)

    def learn(self, body: dict[str, Any]) -> dict[str, Any]:
        """Count one feedback; says whether it was counted, and why not."""
        attempt_id = body.get("attempt_id")
        if isinstance(attempt_id, str) and attempt_id in self.attempts:
            return {"counted": False, "duplicate": True}
        self.feedback.append(body)
        if isinstance(attempt_id, str):
            self.attempts[attempt_id] = None
            while len(self.attempts) > MAX_ATTEMPTS_REMEMBERED:
                self.attempts.popitem(last=False)
        key = self._key(body)
        outcome = body.get("outcome")
        if key is None or outcome not in SUCCESS_OUTCOMES | FAILURE_OUTCOMES:
            return {"counted": False, "duplicate": False}
        tally = self.tallies.setdefault(key, Tally())
        if outcome in SUCCESS_OUTCOMES:
            tally.successes += 1
        else:
            tally.failures += 1
        return {"counted": True, "duplicate": False, "action": key[3]}

    def _key(self, body: dict[str, Any]) -> Key | None:
        incident_type, plugin = body.get("incident_type"), body.get("plugin")
        to_version, from_version = body.get("to_version"), body.get("from_version")
        if not (_text(incident_type) and _text(plugin) and _text(to_version)):
            return None
        return (incident_type, plugin, to_version, self._action(body, to_version, from_version))

    def _action(self, body: dict[str, Any], to_version: str, from_version: Any) -> Action:
        """The feedback does not say whether the attempt was a patch or a rollback: an explicit
        "action" field wins, then what this service answered for that incident, then the
        direction of the version change (down is a rollback)."""
        given = body.get("action")
        if given == "patch" or given == "rollback":
            action: Action = given
            return action
        decided = self.decisions.get(str(body.get("incident_id")))
        if decided is not None and decided[1] == to_version:
            return decided[0]
        if isinstance(from_version, str) and version_key(to_version) < version_key(from_version):
            return "rollback"
        return "patch"

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for (incident_type, plugin, version, action), tally in sorted(self.tallies.items()):
            belief = self.belief(incident_type, plugin, version, action)
            rows.append(
                {
                    "incident_type": incident_type,
                    "plugin": plugin,
                    "version": version,
                    "action": action,
                    "successes": tally.successes,
                    "failures": tally.failures,
                    "alpha": round(belief.alpha, 6),
                    "beta": round(belief.beta, 6),
                    "mean": round(belief.mean, 6),
                }
            )
        return rows

    def snapshot(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "tallies": [
                {
                    "incident_type": key[0],
                    "plugin": key[1],
                    "version": key[2],
                    "action": key[3],
                    "successes": tally.successes,
                    "failures": tally.failures,
                }
                for key, tally in self.tallies.items()
            ],
            "attempts": list(self.attempts),
            "feedback": list(self.feedback),
            "decisions": [[i, a, v] for i, (a, v) in self.decisions.items()],
        }

    @classmethod
    def restore(cls, data: dict[str, Any]) -> Knowledge:
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {data.get('format')!r}")
        knowledge = cls()
        for row in data["tallies"]:
            action = row["action"]
            if action not in PRIORS:
                raise ValueError(f"unknown action {action!r}")
            key: Key = (row["incident_type"], row["plugin"], row["version"], action)
            knowledge.tallies[key] = Tally(int(row["successes"]), int(row["failures"]))
        knowledge.attempts.update((str(a), None) for a in data["attempts"])
        knowledge.feedback.extend(data["feedback"])
        for incident_id, action, version in data.get("decisions", []):
            knowledge.decisions[incident_id] = (action, version)
        return knowledge


# --- deciding ---------------------------------------------------------------------------------


def decide_normally(
    request: DecideRequest, knowledge: Knowledge, strategy: Strategy = "rollback"
) -> Answer:
    incident = request.incident
    if incident.type == "heartbeat_missed":
        return Answer(
            action="escalate",
            patch_version=None,
            confidence=0.8,
            explanation="The installation is silent: nothing to patch until it reports again.",
        )
    context = f"{incident.type} on {incident.plugin} {incident.current_version}: "
    known_good = incident.previous_version
    if known_good == incident.current_version:
        known_good = None
    if incident.type == "regression":
        if known_good and strategy == "rollback":
            return _rollback(incident, known_good, knowledge, context)
        ranking = Ranking.of(request, knowledge)
        if ranking.usable:
            return _patch(ranking, context + "regression_strategy forward, so ")
        if known_good:
            return _rollback(
                incident, known_good, knowledge, context + "no newer release to patch to, so "
            )
        return _escalate(context + "a regression with no version to go to; a human should look.")
    if incident.type not in PATCHABLE_TYPES:
        return _escalate(f"No rule for {incident.type}; a human should look.")
    ranking = Ranking.of(request, knowledge)
    if ranking.usable:
        return _patch(ranking, context)
    if known_good:
        why = "no candidate left, so " if ranking.skipped else "no release to try, so "
        return _rollback(incident, known_good, knowledge, context + why, ranking.skipped_text())
    return _escalate(
        f"{context}no release to try and no known-good version; a human should look."
        + ranking.skipped_text()
    )


@dataclass(frozen=True, slots=True)
class Ranking:
    """The patch candidates: those newer than current_version, best posterior mean first
    (ties: the newest), and those skipped because their mean fell below SKIP_BELOW."""

    usable: list[Belief]
    skipped: list[Belief]

    @classmethod
    def of(cls, request: DecideRequest, knowledge: Knowledge) -> Ranking:
        incident = request.incident
        current = incident.current_version
        usable: list[Belief] = []
        skipped: list[Belief] = []
        for version in dict.fromkeys(request.candidates):  # once each, order kept
            # A patch goes forward: the plugin client refuses an update to a lower version.
            if current is not None and version_key(version) <= version_key(current):
                continue
            belief = knowledge.belief(incident.type, incident.plugin, version, "patch")
            (usable if belief.mean >= SKIP_BELOW else skipped).append(belief)
        usable.sort(key=lambda b: (round(b.mean, 9), version_key(b.version)), reverse=True)
        return cls(usable, skipped)

    def skipped_text(self) -> str:
        if not self.skipped:
            return ""
        listed = "; ".join(belief.describe() for belief in self.skipped[:MAX_LISTED])
        more = (
            f" and {len(self.skipped) - MAX_LISTED} more" if len(self.skipped) > MAX_LISTED else ""
        )
        return f" Skipped (posterior below {SKIP_BELOW:g}): {listed}{more}."


def _patch(ranking: Ranking, prefix: str) -> Answer:
    best, others = ranking.usable[0], ranking.usable[1:]
    considered = ""
    if others:
        listed = "; ".join(belief.describe() for belief in others[:MAX_LISTED])
        more = f" and {len(others) - MAX_LISTED} more" if len(others) > MAX_LISTED else ""
        considered = f" Also considered: {listed}{more}."
    return Answer(
        action="patch",
        patch_version=best.version,
        confidence=round(best.mean, 4),
        explanation=(
            f"{prefix}patch to the best candidate, {best.describe()}."
            + considered
            + ranking.skipped_text()
        ),
    )


def _rollback(
    incident: Incident, version: str, knowledge: Knowledge, prefix: str, suffix: str = ""
) -> Answer:
    belief = knowledge.belief(incident.type, incident.plugin, version, "rollback")
    return Answer(
        action="rollback",
        patch_version=version,
        confidence=round(belief.mean, 4),
        explanation=f"{prefix}roll back to the known-good {belief.describe()}.{suffix}",
    )


def _escalate(explanation: str) -> Answer:
    return Answer(action="escalate", patch_version=None, confidence=0.5, explanation=explanation)


# --- state -----------------------------------------------------------------------------------


def load_state(path: Path) -> Knowledge:
    """What a previous run learned, or a blank slate when the file does not exist. A file
    that is there but unreadable stops the service: starting over would silently forget."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Knowledge()
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Knowledge.restore(data)
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"cannot read the state file {path}: {error}") from None


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a crash) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@dataclass
class SiraState:
    mode: Mode
    slow_s: float
    regression_strategy: Strategy
    knowledge: Knowledge
    state_file: Path | None = None
    calls: Counter[str] = field(default_factory=Counter)
    saving: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def save(self) -> None:
        if self.state_file is None:
            return
        # Snapshot and write under one lock: an older snapshot never overwrites a newer one.
        async with self.saving:
            await asyncio.to_thread(write_state, self.state_file, self.knowledge.snapshot())

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "slow_s": self.slow_s,
            "regression_strategy": self.regression_strategy,
            "state_file": None if self.state_file is None else str(self.state_file),
            "calls": dict(self.calls),
            "feedback_count": len(self.knowledge.feedback),
            "posterior_rows": len(self.knowledge.tallies),
        }


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


def _as_strategy(value: str) -> Strategy:
    for strategy in STRATEGIES:
        if strategy == value:
            return strategy
    raise ValueError(f"regression strategy must be one of {', '.join(STRATEGIES)}, not {value!r}")


def create_app(
    token: str,
    mode: str = "normal",
    *,
    slow_s: float = 30.0,
    regression_strategy: str = "rollback",
    state_file: Path | None = None,
) -> FastAPI:
    state = SiraState(
        mode=_as_mode(mode),
        slow_s=slow_s,
        regression_strategy=_as_strategy(regression_strategy),
        knowledge=Knowledge() if state_file is None else load_state(state_file),
        state_file=state_file,
    )
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
        answer = decide_normally(body, state.knowledge, state.regression_strategy)
        if answer.patch_version is not None and answer.action in ("patch", "rollback"):
            action: Action = "patch" if answer.action == "patch" else "rollback"
            state.knowledge.remember_decision(body.incident.id, action, answer.patch_version)
        return answer

    @app.post("/api/sira/feedback", dependencies=[seen, authorized], status_code=202)
    async def store_feedback(body: dict[str, Any]) -> dict[str, Any]:
        result = state.knowledge.learn(body)
        if not result["duplicate"]:
            await state.save()
        return {"stored": len(state.knowledge.feedback), **result}

    @app.get("/api/sira/feedback", dependencies=[authorized])
    async def list_feedback() -> dict[str, list[dict[str, Any]]]:
        return {"items": list(state.knowledge.feedback)}

    @app.get("/api/sira/posterior", dependencies=[authorized])
    async def posterior() -> dict[str, Any]:
        return {
            "priors": {action: {"alpha": a, "beta": b} for action, (a, b) in PRIORS.items()},
            "skip_below": SKIP_BELOW,
            "items": state.knowledge.table(),
        }

    @app.get("/_control", dependencies=[authorized])
    async def show_control() -> dict[str, Any]:
        return state.as_json()

    @app.post("/_control", dependencies=[authorized])
    async def control(body: Control) -> dict[str, Any]:
        if body.mode is not None:
            state.mode = body.mode
        if body.slow_s is not None:
            state.slow_s = body.slow_s
        if body.regression_strategy is not None:
            state.regression_strategy = body.regression_strategy
        if body.reset:
            state.knowledge = Knowledge()
            await state.save()
        return state.as_json()

    return app


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="normal", help="starting mode")
    parser.add_argument("--slow-s", type=float, default=30.0, help="how long mode slow waits (30)")
    parser.add_argument(
        "--regression-strategy",
        choices=STRATEGIES,
        default="rollback",
        help="regressions roll back (default) or patch forward when a newer release exists",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="JSON file keeping the posterior and feedback across restarts",
    )


def main(argv: list[str] | None = None) -> None:
    serve_from_command_line(
        "Reference decision service (SIRA) for selfheal tests and demos.",
        "SIRA_API_TOKEN",
        lambda args: create_app(
            args.token,
            args.mode,
            slow_s=args.slow_s,
            regression_strategy=args.regression_strategy,
            state_file=args.state_file,
        ),
        argv,
        _options,
        prog="python -m sim decision-service",
    )


if __name__ == "__main__":
    main()
