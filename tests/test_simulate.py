"""`selfheal simulate` (issue 7, part 4): a real run as a subprocess on the test's database,
plus unit tests of scenario validation and of the report's statistics on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
import yaml

from sim.fleet.metrics import (
    AttemptRow,
    IncidentRow,
    ReleaseState,
    ReportInputs,
    build_report,
    classify,
    oscillations,
    percentiles,
)
from sim.fleet.scenario import (
    SCENARIO_DIR,
    ScenarioError,
    load_scenario,
    parse_scenario,
    plan_run,
)
from sim.fleet.timeline import FaultRecord, InstallationTruth, VersionChange
from sim.fleet.truth import Truth
from tests.support.processes import descendants
from tests.support.settings import settings_env

SELFHEAL = str(Path(sys.executable).parent / "selfheal")

REPORT_KEYS = {
    "installations",
    "tenants",
    "interval_s",
    "duration_s",
    "incidents",
    "false_incidents",
    "oscillations",
    "mttd_s",
    "mttr_s",
    "by_fault_kind",
    "autopatch_success_rate",
    "rollback_rate",
    "commands_refused",
    "faults",
    "bad_releases",
    "policy",
    "decision_service",
    "heartbeats",
    "drain",
}

SHORT_SCENARIO = {
    "name": "test-webhooks",
    "plugin": "sim_test",
    "initial_version": "1.2.2",
    "duration_s": 40,
    # No baseline errors: the error-spike rule has no minimum request count, so one random
    # error in a small heartbeat could open an error_spike incident (a false one).
    "traffic": {"error_rate": 0},
    "releases": [{"version": "1.2.3", "fixes": ["webhook_failures"]}],
    "faults": [
        {"at_s": 5, "kind": "webhook_failures", "count": 4, "params": {"failure_rate": 0.7}}
    ],
}


# --- a real run ------------------------------------------------------------------------------


@pytest.mark.long_e2e
@pytest.mark.timeout(170)
def test_simulate_detects_and_heals_injected_webhook_failures(settings, tmp_path):
    scenario = tmp_path / "webhooks.yaml"
    scenario.write_text(yaml.safe_dump(SHORT_SCENARIO))
    report_file = tmp_path / "report.json"
    env = settings_env(settings)
    log = tmp_path / "simulate.log"
    argv = [
        SELFHEAL,
        "simulate",
        str(scenario),
        "--installations",
        "20",
        "--tenants",
        "2",
        "--interval",
        "5",
        "--duration",
        "30",
        "--report",
        str(report_file),
        "--seed",
        "7",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    seen: dict[int, tuple[psutil.Process, str]] = {}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 160
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"simulate still running:\n{log.read_text()}"
                # Every process it starts (reference services, API, worker), to check at the
                # end that none outlives it. The latest command line seen wins: a child caught
                # between its fork and its exec still shows its parent's (`simulate ...`).
                for child, cmdline in descendants(proc.pid):
                    seen[child.pid] = (child, " ".join(cmdline.split()[1:4]))
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output
    assert {"decision-service", "staging-runner", "api", "worker"} <= {
        word for _child, cmdline in seen.values() for word in cmdline.split()
    }, seen
    _gone, alive = psutil.wait_procs([child for child, _cmdline in seen.values()], timeout=5)
    assert alive == [], f"left running: {[seen[p.pid][1] for p in alive]}"

    report = json.loads(report_file.read_text())
    assert REPORT_KEYS <= set(report), sorted(REPORT_KEYS - set(report))
    assert report["installations"] == 20
    assert report["tenants"] == 2
    assert report["interval_s"] == 5
    assert report["faults"]["webhook_failures"]["injected"] == 4
    assert report["faults"]["webhook_failures"]["detected"] == 4
    assert report["faults"]["webhook_failures"]["healed"] == 4
    assert report["incidents"] == 4, report["incidents_by_type"]
    assert report["incidents_by_type"] == {"webhook_fail_rate": 4}
    assert report["false_incidents"] == 0, report["false_incident_details"]
    assert report["oscillations"] == 0, report["oscillation_details"]
    assert report["autopatch_success_rate"] == 1.0
    assert report["rollback_rate"] == 0.0
    assert report["commands_refused"] == 0
    assert report["mttd_s"]["count"] == 4 and report["mttr_s"]["count"] == 4
    assert 0 < report["mttd_s"]["p50"] <= report["mttd_s"]["p95"] <= report["mttd_s"]["max"]
    assert report["heartbeats"]["sent"] > 0
    assert report["policy"]["set_by_simulator"] is True
    assert report["policy"]["values"]["autopatch_whitelist"] == report["tenant_ids"]
    assert report["decision_service"]["decisions"] == {"sira": 4}
    assert "drain" in output and "report written to" in output

    # What the report says is what the database holds; the run's installations are disabled
    # afterwards and the policy is back as it was.
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT i.status, count(*) FROM plugin_incidents i WHERE i.tenant_id = ANY(%s)"
            " GROUP BY i.status",
            (report["tenant_ids"],),
        ).fetchall()
        assert rows == [("resolved", 4)]
        statuses = conn.execute(
            "SELECT DISTINCT status FROM merchant_plugins WHERE tenant_id = ANY(%s)",
            (report["tenant_ids"],),
        ).fetchall()
        assert statuses == [("disabled",)]
        policy = conn.execute(
            "SELECT autopatch_enabled, autopatch_whitelist FROM ops_policy WHERE id = 1"
        ).fetchone()
        assert policy == (False, [])
        actors = conn.execute(
            "SELECT DISTINCT actor FROM audit_log WHERE entity = 'ops_policy' AND actor IS NOT NULL"
        ).fetchall()
        assert ("simulator",) in actors


def test_simulate_names_the_bad_field_and_starts_nothing(tmp_path):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(
        yaml.safe_dump({**SHORT_SCENARIO, "faults": [{"at_s": 5, "kind": "meteor", "count": 1}]})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFHEAL_")}
    done = subprocess.run(
        [SELFHEAL, "simulate", str(scenario)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "faults[0].kind" in done.stdout + done.stderr
    assert not (tmp_path / ".selfheal-sim").exists()


# --- scenario validation ---------------------------------------------------------------------


def scenario_error(**changes) -> str:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario({**SHORT_SCENARIO, **changes}, "test.yaml")
    return str(caught.value)


@pytest.mark.parametrize("path", sorted(SCENARIO_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_scenarios_are_valid(path):
    scenario, _ = load_scenario(str(path))
    plan = plan_run(scenario)
    assert plan.faults
    by_name, _ = load_scenario(path.stem)
    assert by_name == scenario


def test_the_required_scenarios_are_shipped():
    assert {p.stem for p in SCENARIO_DIR.glob("*.yaml")} >= {
        "webhook-failures",
        "mixed",
        "bad-release",
        "decision-service-down",
        "demo",
    }


def test_scenario_errors_name_the_field():
    assert "faults[0].kind: Input should be" in scenario_error(
        faults=[{"at_s": 1, "kind": "meteor", "count": 1}]
    )
    assert "faults[0].share/count: give exactly one" in scenario_error(
        faults=[{"at_s": 1, "kind": "error_spike", "count": 1, "share": 0.1}]
    )
    assert "faults[0].duration_s: a silence needs a duration" in scenario_error(
        faults=[{"at_s": 1, "kind": "silence", "count": 1}]
    )
    assert "faults[0].params.version: a bad_release names" in scenario_error(
        faults=[{"at_s": 1, "kind": "bad_release", "count": 1}]
    )
    assert "faults[0].params.version: 9.9.9 is not one of the scenario's releases" in (
        scenario_error(
            faults=[{"at_s": 1, "kind": "bad_release", "count": 1, "params": {"version": "9.9.9"}}]
        )
    )
    assert "faults[0].params.version: release 1.2.3 introduces no problem" in scenario_error(
        faults=[{"at_s": 1, "kind": "bad_release", "count": 1, "params": {"version": "1.2.3"}}]
    )
    assert "faults[0].params: colour not understood for error_spike" in scenario_error(
        faults=[{"at_s": 1, "kind": "error_spike", "count": 1, "params": {"colour": "red"}}]
    )
    assert "faults[0].params.error_rate: must be a number between 0 and 1" in scenario_error(
        faults=[{"at_s": 1, "kind": "error_spike", "count": 1, "params": {"error_rate": 3}}]
    )
    assert "faults[0].at_s: 50 is not before duration_s (40)" in scenario_error(
        faults=[{"at_s": 50, "kind": "error_spike", "count": 1}]
    )
    assert "faults[0].share/count: decision_service_down hits the service" in scenario_error(
        faults=[{"at_s": 1, "kind": "decision_service_down", "count": 1, "duration_s": 5}]
    )
    assert "releases[0].version: 1.2.2 is given twice" in scenario_error(
        releases=[{"version": "1.2.2"}]
    )
    assert "releases[0].version: Value error" not in scenario_error(releases=[{"version": "x1"}])
    assert "releases[0].version: 'x1' is not a version" in scenario_error(
        releases=[{"version": "x1"}]
    )
    assert "releases[0].fixes[0]: Input should be" in scenario_error(
        releases=[{"version": "1.2.3", "fixes": ["bugs"]}]
    )
    assert "colour: Extra inputs are not permitted" in scenario_error(colour="red")
    assert "traffic.error_rate: Input should be less than or equal to 1" in scenario_error(
        traffic={"error_rate": 2}
    )
    assert "plugin: 'no spaces' is not a plugin name" in scenario_error(plugin="no spaces")
    message = scenario_error(duration_s=-1, tenants=0)
    assert "duration_s: Input should be greater than 0" in message
    assert "tenants: Input should be greater than or equal to 1" in message
    assert message.startswith("test.yaml is not a valid scenario:")


def test_scenario_files_that_cannot_be_read(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ScenarioError, match="is not valid YAML"):
        load_scenario(str(broken))
    with pytest.raises(
        ScenarioError, match=r"cannot read the scenario .*nope\.yaml.*shipped: .*mixed"
    ):
        load_scenario("nope")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="a scenario is a YAML mapping"):
        load_scenario(str(listing))


def test_plan_applies_the_overrides_and_scales_faults():
    scenario = parse_scenario(
        {
            **SHORT_SCENARIO,
            "duration_s": 100,
            "faults": [
                {"at_s": 5, "kind": "webhook_failures", "share": 0.1},
                {"at_s": 6, "kind": "error_spike", "count": 5},
                {"at_s": 7, "kind": "decision_service_down", "duration_s": 10},
                {"at_s": 60, "kind": "crash_loop", "count": 1},
            ],
        }
    )
    plan = plan_run(scenario, installations=100, tenants=4, interval_s=7)
    assert (plan.installations, plan.tenants, plan.interval_s) == (100, 4, 7)
    assert [(f.kind, f.installations) for f in plan.faults] == [
        ("webhook_failures", 10),
        ("error_spike", 5),
        ("decision_service_down", 0),
        ("crash_loop", 1),
    ]
    assert plan.faulty_share == 0.16
    doubled = plan_run(scenario, installations=100, faulty_share=0.32)
    assert [f.installations for f in doubled.faults] == [20, 10, 0, 2]
    cut = plan_run(scenario, installations=100, duration_s=50)
    assert [f.kind for f in cut.faults] == [
        "webhook_failures",
        "error_spike",
        "decision_service_down",
    ]
    assert plan_run(scenario).interval_s == 10  # not in the scenario: the default
    with pytest.raises(ValueError, match="--tenants must be between 1 and"):
        plan_run(scenario, installations=3, tenants=5)
    with pytest.raises(ValueError, match="--faulty-share must be between 0 and 1"):
        plan_run(scenario, faulty_share=1.5)


def test_truth_fixes_accumulate_and_problems_do_not():
    scenario = parse_scenario(
        {
            **SHORT_SCENARIO,
            "releases": [
                {"version": "1.2.3", "fixes": ["webhook_failures"]},
                {"version": "1.2.4", "introduces": {"error_spike": {"error_rate": 0.2}}},
                {"version": "1.3.0", "fixes": ["crash_loop"], "passes_staging": False},
            ],
        }
    )
    truth = Truth(scenario)
    assert truth.fixes("1.2.2") == frozenset()
    assert truth.fixes("1.2.4") == {"webhook_failures"}
    assert truth.fixes("1.3.0") == {"webhook_failures", "crash_loop"}
    assert truth.introduces("1.2.4")["error_spike"].error_rate == 0.2
    assert truth.introduces("1.3.0") == {}
    assert truth.bad_versions() == ["1.2.4"]
    staging = truth.staging_truth()["sim_test"]
    assert staging["1.3.0"]["passes_staging"] is False
    assert staging["1.2.3"]["passes_staging"] is True


# --- the report's statistics -----------------------------------------------------------------

T0 = 1_000_000.0


def truth_for_stats() -> Truth:
    return Truth(
        parse_scenario(
            {
                **SHORT_SCENARIO,
                "duration_s": 1000,
                "releases": [
                    {"version": "1.2.3", "introduces": ["error_spike"]},
                    {"version": "1.2.4", "fixes": ["webhook_failures", "error_spike"]},
                ],
                "faults": [],
            }
        )
    )


def installation(name: str, *changes: tuple[float, str, str], faults=()) -> InstallationTruth:
    record = InstallationTruth(name, "tenant-a")
    record.versions.append(VersionChange(T0, "1.2.2", "initial"))
    for at, version, cause in changes:
        record.versions.append(VersionChange(T0 + at, version, cause))
    record.faults.extend(faults)
    return record


def incident(name: str, type_: str, detected: float, *, status="resolved", resolved=None, iid=None):
    return IncidentRow(
        id=iid or f"{name}-{type_}-{detected}",
        installation_id=name,
        tenant_id="tenant-a",
        type=type_,
        severity="medium",
        status=status,
        detected_at=T0 + detected,
        resolved_at=None if resolved is None else T0 + resolved,
        first_bad_signal_at=T0 + detected - 0.5,
    )


def test_percentiles_interpolate_between_ranks():
    assert percentiles([]) == {"p50": None, "p95": None, "max": None, "count": 0}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "max": 7.0, "count": 1}
    assert percentiles([4, 1, 3, 2]) == {"p50": 2.5, "p95": 3.85, "max": 4, "count": 4}
    assert percentiles(range(1, 101)) == {"p50": 50.5, "p95": 95.05, "max": 100, "count": 100}


def test_incidents_are_judged_against_the_truth_at_detection():
    truth = truth_for_stats()
    webhook = FaultRecord(1, "sick", "webhook_failures", T0 + 100, None)
    records = {
        "sick": installation("sick", (160, "1.2.4", "update"), faults=[webhook]),
        "healthy": installation("healthy"),
    }
    judged = {
        c.incident.id: c
        for c in classify(
            [
                incident("sick", "webhook_fail_rate", 108, iid="true"),
                incident("sick", "error_spike", 110, iid="mismatched"),
                # The fault was fixed at 160: a heartbeat at 163 still carried its traffic.
                incident("sick", "webhook_fail_rate", 163, iid="lagging"),
                incident("sick", "webhook_fail_rate", 400, iid="after-fix"),
                incident("sick", "webhook_fail_rate", 50, iid="before"),
                incident("healthy", "webhook_fail_rate", 108, iid="healthy"),
                incident("elsewhere", "webhook_fail_rate", 108, iid="not-ours"),
            ],
            records,
            truth,
            interval_s=10,
            horizon=T0 + 1000,
        )
    }
    assert {k: c.verdict for k, c in judged.items()} == {
        "true": "true",
        "mismatched": "mismatched",
        "lagging": "true",
        "after-fix": "false",
        "before": "false",
        "healthy": "false",
    }
    assert judged["true"].fault is webhook
    assert (judged["true"].stale, judged["lagging"].stale) == (False, True)


def test_oscillations_are_returns_to_a_rolled_back_version_or_repeated_flips():
    plain = installation("plain", (50, "1.2.4", "update"))
    back_and_forth = installation(
        "back", (50, "1.2.3", "update"), (80, "1.2.2", "rollback"), (120, "1.2.3", "update")
    )
    flips = installation(
        "flips",
        (50, "1.2.3", "update"),
        (80, "1.2.2", "rollback"),
        (120, "1.2.4", "update"),
        faults=[FaultRecord(2, "flips", "webhook_failures", T0 + 40, None)],
    )
    one_flip = installation(
        "one-flip",
        (50, "1.2.3", "update"),
        (80, "1.2.2", "rollback"),
        faults=[FaultRecord(3, "one-flip", "webhook_failures", T0 + 40, None)],
    )
    deployed = installation(
        "deployed",
        (50, "1.2.3", "deploy"),
        (70, "1.2.2", "rollback"),
        faults=[FaultRecord(4, "deployed", "bad_release", T0 + 50, None, version="1.2.3")],
    )
    found = {
        o["installation_id"]: o["reasons"]
        for o in oscillations([plain, back_and_forth, flips, one_flip, deployed], T0, T0 + 1000)
    }
    assert set(found) == {"back", "flips"}
    assert "updated to 1.2.3 at 120.0 s after being rolled back from it at 80.0 s" in found["back"]
    assert found["flips"] == [
        "2 patch/rollback flips for the webhook_failures fault started at 40.0 s"
        " (update -> rollback -> update)"
    ]


def test_report_figures_on_synthetic_data():
    truth = truth_for_stats()
    records = [
        # webhook failures from 100, patched at 140: detected 108, resolved 160
        installation(
            "a",
            (140, "1.2.4", "update"),
            faults=[FaultRecord(1, "a", "webhook_failures", T0 + 100, None)],
        ),
        # operators deploy the bad 1.2.3 at 200; rolled back at 240; resolved 250
        installation(
            "b",
            (200, "1.2.3", "deploy"),
            (240, "1.2.2", "rollback"),
            faults=[FaultRecord(2, "b", "bad_release", T0 + 200, None, version="1.2.3")],
        ),
        # a silence from 300 to 400 (expired), detected at 370, resolved 410
        installation("c", faults=[FaultRecord(3, "c", "silence", T0 + 300, T0 + 400)]),
        # an error spike from 500 never healed; detected 512, still open
        installation("d", faults=[FaultRecord(4, "d", "error_spike", T0 + 500, None)]),
        # healthy, with a false incident
        installation("e"),
    ]
    incidents = [
        incident("a", "webhook_fail_rate", 108, resolved=160),
        # an echo: opened after the fix at 140, from telemetry of before; closed at once
        incident("a", "webhook_fail_rate", 145, resolved=145),
        incident("b", "regression", 212, resolved=250),
        incident("c", "heartbeat_missed", 370, resolved=410),
        incident("d", "error_spike", 512, status="blocked_by_policy"),
        incident("e", "error_spike", 600, status="resolved", resolved=630),
    ]
    attempts = [
        AttemptRow("1", None, "a", "patch", "1.2.2", "1.2.4", "success", True, T0 + 120),
        AttemptRow("2", None, "b", "rollback", "1.2.3", "1.2.2", "success", True, T0 + 230),
        AttemptRow("3", None, "d", "patch", "1.2.2", "1.2.3", "rolled_back", True, T0 + 520),
        AttemptRow("4", None, "d", "patch", "1.2.2", "1.2.4", "verifying", True, T0 + 600),
    ]
    report = build_report(
        ReportInputs(
            run={"run_id": "r1", "scenario": "synthetic"},
            t0=T0,
            horizon=T0 + 1000,
            installations=5,
            tenants=1,
            interval_s=10,
            duration_s=900,
            truth=truth,
            records=records,
            incidents=incidents,
            fleet_incidents=[],
            attempts=attempts,
            releases=[ReleaseState("1.2.3", True, "rolled back 3 times")],
            policy={"values": {}},
            decision_service={},
            heartbeats={"sent": 10, "failed": 1},
            commands={"applied": 2, "refused": 1, "failed": 0},
            refusal_reasons={},
            injections=[],
            drain={"bound_s": 110},
        )
    )
    assert report["incidents"] == 6
    assert report["stale_incidents"] == 1
    assert report["stale_incident_details"][0]["detected_at_s"] == 145
    assert report["false_incidents"] == 1
    assert report["false_incident_details"][0]["installation_id"] == "e"
    # a: 8 s, b: 12 s, c: 70 s, d: 12 s
    assert report["mttd_s"] == {"p50": 12.0, "p95": 61.3, "max": 70.0, "count": 4}
    assert report["by_fault_kind"]["webhook_failures"]["mttd_s"]["max"] == 8.0
    assert report["by_fault_kind"]["bad_release"]["mttr_s"]["max"] == 38.0
    # a: 52 s, b: 38 s, c: 40 s; the false incident on e is not counted
    assert report["mttr_s"] == {"p50": 40.0, "p95": 50.8, "max": 52.0, "count": 3}
    assert report["faults"]["webhook_failures"] == {"detected": 1, "healed": 1, "injected": 1}
    assert report["faults"]["bad_release"] == {"detected": 1, "healed": 1, "injected": 1}
    assert report["faults"]["silence"] == {"detected": 1, "expired": 1, "injected": 1}
    assert report["faults"]["error_spike"] == {"detected": 1, "injected": 1, "still_open": 1}
    assert report["autopatch_success_rate"] == round(2 / 3, 4)
    assert report["rollback_rate"] == round(1 / 3, 4)
    assert report["commands_refused"] == 1
    assert report["bad_releases"]["1.2.3"] == {
        "introduces": ["error_spike"],
        "deployed_by_operators": 1,
        "applied_by_selfheal": 0,
        "rolled_back_from": 1,
        "patched_away_from": 0,
        "still_running_at_end": 0,
        "quarantined": True,
        "quarantine_reason": "rolled back 3 times",
    }
    assert report["oscillations"] == 0
    assert report["incidents_open_at_end"] == 1


@pytest.mark.timeout(60)
def test_simulate_says_what_could_not_start(settings, tmp_path):
    """--url pointing at nothing: a clear message and a non-zero exit, no traceback."""
    from tests.support.ports import free_port

    done = subprocess.run(
        [
            SELFHEAL,
            "simulate",
            "webhook-failures",
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=settings_env(settings),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "could not start: the control plane at http://127.0.0.1:" in output
    assert "does not answer" in output
    assert "Traceback" not in output
