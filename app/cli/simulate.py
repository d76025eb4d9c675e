"""`selfheal simulate`: a simulated fleet against the control plane (docs/simulator.md). The
run itself is app/simulation/runner.py; this module is its command line.

Registered on the root app by app/cli/__init__.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def simulate(
    scenario_file: Annotated[
        str | None,
        typer.Argument(
            metavar="[SCENARIO_FILE]",
            help="A scenario YAML file, or the name of a shipped one (sim/scenarios/:"
            " mixed, webhook-failures, bad-release, decision-service-down, demo); default mixed",
        ),
    ] = None,
    installations: Annotated[
        int | None,
        typer.Option(min=1, help="Simulated installations (default: the scenario's, else 100)"),
    ] = None,
    tenants: Annotated[
        int | None,
        typer.Option(min=1, help="Tenants they belong to (default: the scenario's, else 10)"),
    ] = None,
    interval: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Heartbeat interval in seconds (SELFHEAL_HEARTBEAT_INTERVAL_S of the API it starts; default: the scenario's, else 10)",
        ),
    ] = None,
    faulty_share: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of the fleet the faults take, all together (scales every fault)",
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(min=1.0, help="Seconds of faults and traffic (default: the scenario's)"),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Write the report as JSON to this file")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            help="Use the control plane running at this URL instead of starting one (needs its database settings; the policy is not touched)"
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Random seed (fault placement, traffic); printed when not given"),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Data folder (embedded services, run folders); default ./.selfheal-sim, or SELFHEAL_DATA_DIR with --url"
        ),
    ] = None,
    early_report: Annotated[
        bool,
        typer.Option(
            "--early-report/--no-early-report",
            help="Simulated plugins report trouble at once (plugin_client's default), or only"
            " on their heartbeat schedule",
        ),
    ] = True,
) -> None:
    """Run a simulated fleet of plugins against the control plane and report how it healed
    them (docs/simulator.md)."""
    # Imported here, not at the top: the simulator (httpx, rich, sim/, SQLAlchemy) costs over
    # a second that every other command would pay.
    from app.simulation.runner import SimulateOptions
    from app.simulation.runner import simulate as run_simulation

    raise typer.Exit(
        run_simulation(
            SimulateOptions(
                scenario=scenario_file,
                installations=installations,
                tenants=tenants,
                interval=interval,
                faulty_share=faulty_share,
                duration=duration,
                report=report,
                url=url,
                seed=seed,
                data_dir=data_dir,
                early_report=early_report,
            )
        )
    )
