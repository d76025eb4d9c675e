"""The `selfheal` command line (DESIGN.md, "Command line")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError

from app.core.settings import Settings, libpq_url
from app.notifications.cli import notify_cli
from app.releases.cli import keys_cli, release_cli

T = TypeVar("T")

cli = typer.Typer(
    help="selfheal: a self-healing incident control plane for plugins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plugin_cli = typer.Typer(
    help="Plugin installations and their signing secrets.", no_args_is_help=True
)
user_cli = typer.Typer(help="Ops users and their API tokens.", no_args_is_help=True)
cli.add_typer(plugin_cli, name="plugin")
cli.add_typer(user_cli, name="user")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(release_cli, name="release")
cli.add_typer(notify_cli, name="notify")

REPO_ROOT = Path(__file__).resolve().parent.parent


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"selfheal: {message}", err=True)
    return typer.Exit(code)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; a bad value stops here with the variable's name."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise fail("invalid settings:\n  " + "\n  ".join(lines)) from None


@contextlib.contextmanager
def running_services(settings: Settings, *, redis: bool = True) -> Iterator[Settings]:
    """With DATABASE_URL (and, when `redis`, REDIS_URL) set, use them. Otherwise start (or
    join, when `selfheal up` already runs them) the embedded PostgreSQL and Redis under
    SELFHEAL_DATA_DIR; the ones this process started are stopped when it leaves. Commands that
    only touch the database pass redis=False and never start a Redis."""
    need_postgres = settings.database_url is None
    need_redis = redis and settings.redis_url is None
    if not (need_postgres or need_redis):
        yield settings
        return
    from app.core.embedded import EmbeddedServices

    embedded = EmbeddedServices(
        settings.data_dir,
        postgres=need_postgres,
        redis=need_redis,
    )
    try:
        embedded.start()
    except Exception as exc:
        raise fail(f"could not start the embedded services: {exc}") from exc
    try:
        updates: dict[str, str] = {}
        if embedded.database_url:
            updates["DATABASE_URL"] = embedded.database_url
        if embedded.redis_url:
            updates["REDIS_URL"] = embedded.redis_url
        # Child processes (uvicorn workers) read their settings from the environment.
        os.environ.update(updates)
        yield load_settings()
    finally:
        embedded.stop()


@contextlib.contextmanager
def reporting_database_errors(settings: Settings) -> Iterator[None]:
    """An unreachable database is an operator's problem to fix, not a traceback to read."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        where = _redact(libpq_url(settings.database_url or ""))
        first_line = str(exc.orig or exc).strip().splitlines()[0]
        raise fail(f"cannot use PostgreSQL at {where}: {first_line}", code=1) from None


def run_migrations(settings: Settings) -> None:
    from alembic import command
    from alembic.config import Config

    assert settings.database_url is not None
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    with reporting_database_errors(settings):
        command.upgrade(config, "head")


def _terminate_on_sigterm() -> None:
    """SIGTERM ends the process like Ctrl-C, so context managers stop embedded services."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _serve(settings: Settings, *, port: int, workers: int) -> None:
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
        f" ({workers} worker{'s' if workers > 1 else ''}; health: /health, metrics: /metrics)",
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


@cli.command()
def up(
    port: Annotated[int | None, typer.Option(help="HTTP port (default: PORT or 8112)")] = None,
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
        from app.simulation.runner import demo as run_demo

        raise typer.Exit(run_demo(port))
    _terminate_on_sigterm()
    settings = load_settings()
    try:
        with running_services(settings) as settings:
            _describe(settings)
            run_migrations(settings)
            with worker_process():
                _serve(settings, port=port or settings.port, workers=1)
    except KeyboardInterrupt:
        pass
    typer.echo("selfheal stopped", err=True)


@cli.command()
def api(
    port: Annotated[int | None, typer.Option(help="HTTP port (default: PORT or 8112)")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the API only (migrations are `selfheal migrate`)."""
    _terminate_on_sigterm()
    settings = load_settings()
    try:
        with running_services(settings) as settings:
            _serve(settings, port=port or settings.port, workers=workers)
    except KeyboardInterrupt:
        pass


@cli.command()
def worker() -> None:
    """Run a worker (arq): detection every SELFHEAL_DETECT_EVERY_S. Run as many as you like."""
    from workers.main import run_worker

    settings = load_settings()
    try:
        with running_services(settings) as settings:
            run_worker(settings)
    except KeyboardInterrupt:
        pass


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


@cli.command()
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


@cli.command()
def migrate() -> None:
    """Bring the database schema to the latest revision."""
    with running_services(load_settings(), redis=False) as settings:
        run_migrations(settings)
    typer.echo("database schema is up to date", err=True)


def _describe(settings: Settings) -> None:
    typer.echo(f"PostgreSQL: {_redact(libpq_url(settings.database_url or ''))}", err=True)
    typer.echo(f"Redis: {_redact(settings.redis_url or '')}", err=True)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{host}"


def _with_database(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(session)` in one transaction against the configured database."""
    from app.core.db import create_engine, create_sessionmaker

    async def main() -> T:
        engine = create_engine(settings, role="cli")
        try:
            async with create_sessionmaker(engine)() as session, session.begin():
                return await work(session)
        finally:
            await engine.dispose()

    with reporting_database_errors(settings):
        return asyncio.run(main())


def _print(data: dict[str, Any], as_json: bool, note: str) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
        return
    width = max(len(key) for key in data)
    for key, value in data.items():
        typer.echo(f"{key.ljust(width)}  {value}")
    typer.echo(note, err=True)


@plugin_cli.command("register")
def plugin_register(
    tenant: Annotated[str, typer.Option(help="Tenant (merchant) id; created if new")],
    name: Annotated[str, typer.Option(help="Plugin name")],
    version: Annotated[str, typer.Option(help="Installed plugin version")],
    env: Annotated[str, typer.Option(help="Environment of the installation")] = "prod",
    artifact: Annotated[
        Path | None,
        typer.Option(
            "--artifact",
            help="The installed version's artifact: recorded and signed as a release (like"
            " `selfheal release add`, needs the signing key), so the control plane can serve"
            " that version too",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Register an installation; prints its id and signing secret (shown once)."""
    from app.core.crypto import SecretBox
    from app.plugins.service import check_registration, register_installation
    from app.releases.cli import _signer_or_fail
    from app.releases.service import AddedRelease, ReleaseConflict, add_release
    from app.releases.signing import key_path

    try:
        check_registration(tenant, name, version, env)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if artifact is not None and not artifact.is_file():
        raise fail(f"--artifact {artifact}: no such file")
    settings = load_settings()
    signer = _signer_or_fail(key_path(settings)) if artifact is not None else None
    added: list[AddedRelease] = []

    async def register(session: Any) -> Any:
        # One transaction: a release that cannot be recorded registers nothing.
        if artifact is not None and signer is not None:
            added.append(
                await add_release(
                    session,
                    signer,
                    plugin=name,
                    version=version,
                    artifact=artifact,
                    max_bytes=settings.artifact_max_bytes,
                )
            )
        return await register_installation(
            session, box, tenant=tenant, name=name, version=version, env=env
        )

    with running_services(settings, redis=False) as settings:
        box = SecretBox(settings.secret_key)
        try:
            issued = _with_database(settings, register)
        except ReleaseConflict as exc:
            raise fail(str(exc), code=1) from None
        except ValueError as exc:
            raise fail(str(exc)) from None
    release = {"release": added[0].outcome, "sha256": added[0].release.sha256} if added else {}
    _print(
        {
            "plugin_id": str(issued.plugin_id),
            "secret": issued.secret,
            "tenant": tenant,
            "name": name,
            "version": version,
            "env": env,
            **release,
        },
        as_json,
        "Store the secret now: it is not shown again (`selfheal plugin rotate-secret` issues a new one).",
    )


@plugin_cli.command("rotate-secret")
def plugin_rotate_secret(
    plugin_id: Annotated[str, typer.Argument(help="Installation id")],
    grace_s: Annotated[
        int | None,
        typer.Option(
            min=0, help="How long the old secret stays valid (default SELFHEAL_SECRET_GRACE_S)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Issue a new secret; the old one stays valid for the grace period."""
    from app.core.crypto import SecretBox
    from app.plugins.service import rotate_secret

    try:
        installation_id = uuid.UUID(plugin_id)
    except ValueError:
        raise fail(f"{plugin_id!r} is not an installation id (a UUID)") from None
    with running_services(load_settings(), redis=False) as settings:
        grace = settings.secret_grace_s if grace_s is None else grace_s
        box = SecretBox(settings.secret_key)
        try:
            issued = _with_database(
                settings, lambda s: rotate_secret(s, box, installation_id, grace_s=grace)
            )
        except LookupError as exc:
            raise fail(str(exc), code=1) from None
    _print(
        {
            "plugin_id": str(issued.plugin_id),
            "secret": issued.secret,
            "old_secret_valid_for_s": grace,
        },
        as_json,
        "Store the new secret now: it is not shown again.",
    )


@user_cli.command("add")
def user_add(
    username: Annotated[str, typer.Argument(help="Login name")],
    role: Annotated[str, typer.Option(help="viewer | operator | admin")] = "viewer",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Create an ops user; prints a generated password and an API token (shown once)."""
    from app.ops.security import add_user

    if role not in ("viewer", "operator", "admin"):
        raise fail("--role must be one of viewer, operator, admin")
    with running_services(load_settings(), redis=False) as settings:
        try:
            user = _with_database(settings, lambda s: add_user(s, username, role))
        except ValueError as exc:
            raise fail(str(exc), code=1) from None
        except Exception as exc:
            if "ck_ops_users_username" in str(exc):
                raise fail(
                    f"{username!r} is not a valid user name (letters, digits, ._@-)"
                ) from None
            raise
    _print(
        {
            "username": user.username,
            "role": user.role,
            "password": user.password,
            "token": user.token,
        },
        as_json,
        "Store the password and token now: they are not shown again.",
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
