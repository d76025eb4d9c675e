"""Scenario files of the fleet simulator (docs/simulator.md, "Scenario files").

A scenario is YAML: the simulated plugin (name, initial version), its releases (what each one
fixes or introduces, whether it passes staging), the traffic every installation generates,
and the fault schedule. `load_scenario` validates it and raises ScenarioError naming every
bad field (`faults[2].kind: ...`); `plan_run` applies the command line's overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from plugin_client.versions import is_valid_version, version_key

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
DEFAULT_SCENARIO = "mixed"
DEFAULT_INTERVAL_S = 10

# Problems a plugin version can have (and a release fix or introduce).
ProblemKind = Literal["error_spike", "webhook_failures", "crash_loop"]
PROBLEM_KINDS: tuple[ProblemKind, ...] = ("error_spike", "webhook_failures", "crash_loop")
FaultKind = Literal[
    "error_spike",
    "webhook_failures",
    "silence",
    "crash_loop",
    "bad_release",
    "decision_service_down",
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "error_spike",
    "webhook_failures",
    "silence",
    "crash_loop",
    "bad_release",
    "decision_service_down",
)
# Faults that land on installations (decision_service_down lands on the decision service).
INSTALLATION_FAULTS = frozenset(FAULT_KINDS) - {"decision_service_down"}
DEFAULT_ERROR_RATE = 0.3
DEFAULT_WEBHOOK_FAILURE_RATE = 0.7
DECISION_SERVICE_MODES = ("error", "slow", "garbage")
_PLUGIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Parameters each fault kind takes (all optional, except bad_release's version).
_FAULT_PARAMS: dict[str, frozenset[str]] = {
    "error_spike": frozenset({"error_rate"}),
    "webhook_failures": frozenset({"failure_rate"}),
    "silence": frozenset(),
    "crash_loop": frozenset(),
    "bad_release": frozenset({"version"}),
    "decision_service_down": frozenset({"mode"}),
}


class ScenarioError(ValueError):
    """The scenario file cannot be used; the message names the file and every bad field."""


def _version(value: Any) -> Any:
    # YAML reads `version: 1.2` as a float: a plain scalar is still meant as text.
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and not is_valid_version(value):
        raise ValueError(f"{value!r} is not a version (digits first, like 1.2.3)")
    return value


Version = Annotated[str, BeforeValidator(_version)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Traffic(_Strict):
    """What every installation does per second while healthy (counts drawn at random around
    these rates, recorded in bulk before each heartbeat)."""

    requests_per_s: float = Field(10.0, gt=0, le=1_000_000)
    error_rate: float = Field(0.002, ge=0, le=1)
    webhooks_per_s: float = Field(4.0, ge=0, le=1_000_000)
    webhook_failure_rate: float = Field(0.01, ge=0, le=1)
    latency_ms: float = Field(120.0, ge=0, le=3_600_000)


class ProblemParams(_Strict):
    """How bad a problem is: error_rate for error_spike, failure_rate for webhook_failures."""

    error_rate: float | None = Field(None, ge=0, le=1)
    failure_rate: float | None = Field(None, ge=0, le=1)


def _problem_map(value: Any) -> Any:
    """`introduces` may be a list of kinds or a mapping kind -> parameters."""
    if isinstance(value, list):
        return {kind: {} for kind in value}
    if isinstance(value, dict):
        return {kind: ({} if params is None else params) for kind, params in value.items()}
    return value


class Release(_Strict):
    version: Version
    fixes: list[ProblemKind] = Field(default_factory=list)
    introduces: Annotated[dict[ProblemKind, ProblemParams], BeforeValidator(_problem_map)] = Field(
        default_factory=dict
    )
    passes_staging: bool = True
    detail: str | None = Field(None, max_length=500)


class Fault(_Strict):
    at_s: float = Field(ge=0)
    kind: FaultKind
    share: float | None = Field(None, gt=0, le=1)
    count: int | None = Field(None, ge=1)
    duration_s: float | None = Field(None, gt=0)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _per_kind(self) -> Fault:
        kind = self.kind
        unknown = sorted(set(self.params) - _FAULT_PARAMS[kind])
        if unknown:
            allowed = ", ".join(sorted(_FAULT_PARAMS[kind])) or "none"
            raise ValueError(
                f"params: {', '.join(unknown)} not understood for {kind} (allowed: {allowed})"
            )
        for name in ("error_rate", "failure_rate"):
            value = self.params.get(name)
            if name in self.params and (
                isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
            ):
                raise ValueError(f"params.{name}: must be a number between 0 and 1")
        if kind == "decision_service_down":
            if self.share is not None or self.count is not None:
                raise ValueError(
                    "share/count: decision_service_down hits the service, not installations"
                )
            if self.duration_s is None:
                raise ValueError("duration_s: decision_service_down needs a duration")
            mode = self.params.get("mode", "error")
            if mode not in DECISION_SERVICE_MODES:
                raise ValueError(
                    f"params.mode: must be one of {', '.join(DECISION_SERVICE_MODES)}, not {mode!r}"
                )
            return self
        if (self.share is None) == (self.count is None):
            raise ValueError("share/count: give exactly one of share (0..1) or count")
        if kind == "silence" and self.duration_s is None:
            raise ValueError("duration_s: a silence needs a duration")
        if kind == "bad_release":
            if self.duration_s is not None:
                raise ValueError(
                    "duration_s: a bad release lasts until the installation's version changes"
                )
            if "version" not in self.params:
                raise ValueError("params.version: a bad_release names the version deployed")
            try:
                _version(self.params["version"])
            except ValueError as error:
                raise ValueError(f"params.version: {error}") from None
        return self

    @property
    def target_version(self) -> str:
        return str(_version(self.params["version"]))


class Scenario(_Strict):
    name: str = Field(min_length=1, max_length=100)
    description: str = ""
    plugin: str
    initial_version: Version
    duration_s: float = Field(gt=0, le=7 * 86400)
    interval_s: int | None = Field(None, ge=1, le=86400)
    installations: int = Field(100, ge=1, le=100_000)
    tenants: int = Field(10, ge=1, le=10_000)
    loop: bool = False
    traffic: Traffic = Field(default_factory=Traffic)
    releases: list[Release] = Field(default_factory=list)
    faults: list[Fault] = Field(default_factory=list)

    @field_validator("plugin")
    @classmethod
    def _plugin_name(cls, value: str) -> str:
        if not _PLUGIN_NAME.match(value):
            raise ValueError(f"{value!r} is not a plugin name (expected {_PLUGIN_NAME.pattern})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        seen = {version_key(self.initial_version): "initial_version"}
        for index, release in enumerate(self.releases):
            key = version_key(release.version)
            if key in seen:
                raise ValueError(
                    f"releases[{index}].version: {release.version} is given twice"
                    f" (also {seen[key]})"
                )
            seen[key] = f"releases[{index}]"
        by_version = {r.version: r for r in self.releases}
        for index, fault in enumerate(self.faults):
            if fault.at_s >= self.duration_s:
                raise ValueError(
                    f"faults[{index}].at_s: {fault.at_s:g} is not before duration_s"
                    f" ({self.duration_s:g})"
                )
            if fault.kind == "bad_release":
                target = by_version.get(fault.target_version)
                if target is None:
                    raise ValueError(
                        f"faults[{index}].params.version: {fault.target_version} is not one of"
                        " the scenario's releases"
                    )
                if not target.introduces:
                    raise ValueError(
                        f"faults[{index}].params.version: release {fault.target_version}"
                        " introduces no problem (give it `introduces:`)"
                    )
        return self

    def release(self, version: str) -> Release | None:
        return next((r for r in self.releases if r.version == version), None)


def _where(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "scenario"


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a YAML mapping (name:, plugin:, ...)")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            # A model-level check names its own field at the start of its message.
            loc = tuple(error["loc"])
            if error["type"] == "value_error" and re.match(r"^[a-z_/]+(\[\d+\])?[.:\[]", message):
                where = _where(loc)
                lines.append(f"{where}.{message}" if where != "scenario" else message)
            else:
                lines.append(f"{_where(loc)}: {message}")
        raise ScenarioError(f"{source} is not a valid scenario:\n  " + "\n  ".join(lines)) from None


def resolve_path(name_or_path: str | None) -> Path:
    """A file path, or the name of a shipped scenario (`mixed`, `demo`, ...)."""
    if name_or_path is None:
        return SCENARIO_DIR / f"{DEFAULT_SCENARIO}.yaml"
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        return path
    return SCENARIO_DIR / f"{name_or_path}.yaml"


def load_scenario(name_or_path: str | None) -> tuple[Scenario, Path]:
    path = resolve_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        shipped = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml")))
        raise ScenarioError(
            f"cannot read the scenario {path}: {error.strerror or error} (shipped: {shipped})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ScenarioError(f"{path} is not valid YAML: {error}") from None
    return parse_scenario(data, str(path)), path


@dataclass(frozen=True, slots=True)
class PlannedFault:
    """A fault of the schedule after the overrides: how many installations it takes."""

    index: int
    at_s: float
    kind: FaultKind
    installations: int  # 0 for decision_service_down
    duration_s: float | None
    params: dict[str, Any]

    @property
    def target_version(self) -> str | None:
        version = self.params.get("version")
        return None if version is None else str(_version(version))


@dataclass(frozen=True, slots=True)
class RunPlan:
    scenario: Scenario
    installations: int
    tenants: int
    interval_s: int
    duration_s: float
    faulty_share: float  # share of the fleet the installation faults take (summed)
    faults: tuple[PlannedFault, ...]
    loop: bool


def _takes(fault: Fault, installations: int) -> float:
    if fault.count is not None:
        return float(fault.count)
    assert fault.share is not None
    return fault.share * installations


def _count(raw: float) -> int:
    return 0 if raw <= 0 else max(1, round(raw))


def plan_run(
    scenario: Scenario,
    *,
    installations: int | None = None,
    tenants: int | None = None,
    interval_s: int | None = None,
    faulty_share: float | None = None,
    duration_s: float | None = None,
) -> RunPlan:
    """The scenario with the command line's overrides. `faulty_share` scales every
    installation fault (share and count alike) so that, together, they take that share of
    the fleet; ValueError naming the option when an override cannot apply."""
    n = scenario.installations if installations is None else installations
    t = scenario.tenants if tenants is None else tenants
    if n < 1:
        raise ValueError("--installations must be at least 1")
    if not 1 <= t <= n:
        raise ValueError(f"--tenants must be between 1 and the number of installations ({n})")
    interval = interval_s or scenario.interval_s or DEFAULT_INTERVAL_S
    if interval < 1:
        raise ValueError("--interval must be at least 1 s")
    duration = scenario.duration_s if duration_s is None else duration_s
    if duration <= 0:
        raise ValueError("--duration must be positive")
    takes = [_takes(f, n) if f.kind in INSTALLATION_FAULTS else 0.0 for f in scenario.faults]
    total = sum(takes) / n
    factor = 1.0
    if faulty_share is not None:
        if not 0 <= faulty_share <= 1:
            raise ValueError("--faulty-share must be between 0 and 1")
        if total == 0 and faulty_share > 0:
            raise ValueError("--faulty-share: the scenario injects no fault on installations")
        factor = faulty_share / total if total else 0.0
    planned = []
    for index, (fault, raw) in enumerate(zip(scenario.faults, takes, strict=True)):
        if fault.at_s >= duration and not scenario.loop:
            continue  # --duration cut it off
        planned.append(
            PlannedFault(
                index=index,
                at_s=fault.at_s,
                kind=fault.kind,
                installations=_count(raw * factor) if fault.kind in INSTALLATION_FAULTS else 0,
                duration_s=fault.duration_s,
                params=dict(fault.params),
            )
        )
    share = sum(p.installations for p in planned) / n
    return RunPlan(
        scenario=scenario,
        installations=n,
        tenants=t,
        interval_s=int(interval),
        duration_s=float(duration),
        faulty_share=round(share, 4),
        faults=tuple(sorted(planned, key=lambda p: (p.at_s, p.index))),
        loop=scenario.loop,
    )
