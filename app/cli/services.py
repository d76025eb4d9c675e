"""`selfheal up`, `api`, `worker` and `migrate`: the control plane's processes and its schema.

Registered on the root app by app/cli/__init__.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Annotated

import typer

from app.cli._common import (
    describe,
    load_settings,
    migrate_database,
    running_services,
    terminate_on_sigterm,
)
from app.core.settings import Settings

_PORT = Annotated[int | None, typer.Option(help="HTTP port (default: PORT or 8112)")]


def up(
    port: _PORT = None,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Also run both reference services and a small simulated fleet whose faults"
            " get healed (docs/simulator.md); prints a demo operator's token",
        ),
    ] = False,
) -> None:
    """Start everything: embedded PostgreSQL and Redis when no URLs are set, migrations, a
    worker and the API."""
    if demo:
        # Imported here, not at the top: the simulator (httpx, rich, sim/, SQLAlchemy) costs
        # over a second that every other command would pay.
        from app.simulation.runner import demo as run_demo

        raise typer.Exit(run_demo(port))
    terminate_on_sigterm()
    settings = load_settings()
    try:
        with running_services(settings) as settings:
            describe(settings)
            migrate_database(settings)
            if settings.previous_secret_keys:
                _reseal(settings)
            with worker_process():
                _serve(settings, port=port or settings.port, workers=1)
    except KeyboardInterrupt:
        pass
    typer.echo("selfheal stopped", err=True)


def api(
    port: _PORT = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the API only (migrations are `selfheal migrate`)."""
    terminate_on_sigterm()
    settings = load_settings()
    try:
        with running_services(settings) as settings:
            _serve(settings, port=port or settings.port, workers=workers)
    except KeyboardInterrupt:
        pass


def worker() -> None:
    """Run a worker (arq): detection every SELFHEAL_DETECT_EVERY_S. Run as many as you like."""
    # Imported here, not at the top: the worker loads arq, httpx and the whole domain (~1 s)
    # that the other commands do not need.
    from workers.main import run_worker

    settings = load_settings()
    try:
        with running_services(settings) as settings:
            run_worker(settings)
    except KeyboardInterrupt:
        pass


def migrate() -> None:
    """Bring the database schema to the latest revision."""
    with running_services(load_settings(), redis=False, secret_key=False) as settings:
        migrate_database(settings)
    typer.echo("database schema is up to date", err=True)


def _reseal(settings: Settings) -> None:
    """Stored secrets still under a key of SELFHEAL_SECRET_KEY_PREVIOUS sealed under the
    current key (`selfheal secrets rotate-key`), before serving."""
    from app.cli.keyring import reseal_stored_secrets

    rotation = reseal_stored_secrets(settings)
    if rotation.plugin_secrets or rotation.endpoint_secrets:
        typer.echo(
            f"sealed {rotation.plugin_secrets + rotation.endpoint_secrets} stored secret(s)"
            f" under the current SELFHEAL_SECRET_KEY (key id {rotation.key_id})",
            err=True,
        )
    if rotation.unreadable:
        typer.echo(
            f"warning: no configured key opens {', '.join(rotation.unreadable)}"
            " (see `selfheal secrets rotate-key`)",
            err=True,
        )


@contextlib.contextmanager
def worker_process() -> Iterator[subprocess.Popen[bytes]]:
    """`selfheal worker` as a child of `selfheal up`, stopped (SIGTERM, then a bounded wait)
    when `up` stops. It inherits the environment, so it joins the same services."""
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _serve(settings: Settings, *, port: int, workers: int) -> None:
    """The API under uvicorn in this process (`workers` > 1: uvicorn's worker processes, their
    metrics added up through a multiprocess directory removed afterwards)."""
    # Imported here, not at the top: uvicorn and structlog are only needed by `up` and `api`.
    import uvicorn

    from app.core.logging import configure_logging

    configure_logging(settings.log_level)
    if workers > 1:
        # Each worker keeps its own counters; the multiprocess collector adds them up.
        metrics_dir = settings.data_dir / f"prometheus-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    typer.echo(
        f"selfheal API listening on http://{settings.host}:{port}"
        f" ({workers} worker{'s' if workers > 1 else ''}; health: /health, metrics: /metrics;"
        f" dashboard: http://{settings.host}:{port}/ops/login)",
        err=True,
    )
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=settings.host,
            port=port,
            workers=workers,
            loop="uvloop" if sys.platform != "win32" else "asyncio",
            http="httptools",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        if workers > 1:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)
