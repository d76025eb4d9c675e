"""`selfheal audit seal` and `selfheal audit verify`: the keyed seals over the history
(app/audit)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from app.cli._common import (
    JsonOption,
    fail,
    load_settings,
    reporting_database_errors,
    running_services,
)

if TYPE_CHECKING:
    from app.core.settings import Settings

audit_cli = typer.Typer(help="The seals over the history, and checking them.", no_args_is_help=True)


def _run(settings: Settings, work: Any) -> Any:
    # Imported here, not at the top: SQLAlchemy's async engine (~0.4 s), see _common.
    from app.core.db import create_engine, create_sessionmaker
    from app.core.logging import configure_logging

    # Log lines (history_sealed) go to stderr, as the workers' do; stdout is the result.
    configure_logging(settings.log_level)

    async def main() -> Any:
        engine = create_engine(settings, role="cli")
        try:
            return await work(create_sessionmaker(engine))
        finally:
            await engine.dispose()

    with reporting_database_errors(settings):
        return asyncio.run(main())


@audit_cli.command("seal")
def seal(as_json: JsonOption = False) -> None:
    """Seal the rows of the history not sealed yet (the workers do it every
    SELFHEAL_AUDIT_SEAL_EVERY_S) and export the head."""
    from app.audit.service import head_fields, seal_history

    with running_services(load_settings(), redis=False) as settings:
        result = _run(settings, lambda maker: seal_history(maker, settings))
    data: dict[str, Any] = {"sealed": result.sealed, "head_file": str(settings.audit_head_path)}
    if result.head is not None:
        data |= head_fields(result.head)
    if as_json:
        typer.echo(orjson.dumps(data).decode())
    else:
        for key, value in data.items():
            typer.echo(f"{key.ljust(16)}  {value}")


@audit_cli.command("verify")
def verify(
    head_file: Annotated[
        Path | None,
        typer.Option(
            "--head",
            help="The exported head to check against (default: SELFHEAL_AUDIT_HEAD_FILE,"
            " else <data dir>/audit/head.json); keep a copy out of the database's reach",
        ),
    ] = None,
    no_head: Annotated[
        bool,
        typer.Option(
            "--no-head",
            help="Verify without an exported head (seals removed from the end go unnoticed)",
        ),
    ] = False,
    keys: Annotated[
        list[str] | None,
        typer.Option("--key", help="Another key seals may have been made with (repeatable)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Recompute every seal from the rows as they are now. Exit 0: intact; 1: the first row
    that no longer matches, and everything else found, on stdout."""
    from app.audit.service import read_head, verify_history

    with running_services(load_settings(), redis=False) as settings:
        path = head_file or settings.audit_head_path
        try:
            head = read_head(path)
        except (ValueError, KeyError) as exc:
            raise fail(f"{path} is not an exported head: {exc}", code=1) from None
        if head is None and not no_head:
            # Without one, removing the last rows and their seals would pass unnoticed.
            raise fail(
                f"no exported head at {path}: give the copy you keep with --head FILE"
                " (or, knowing what it leaves unchecked, --no-head)",
                code=1,
            )
        result = _run(
            settings,
            lambda maker: verify_history(maker, settings, head=head, extra_keys=keys or ()),
        )
    if as_json:
        typer.echo(
            orjson.dumps(
                {
                    "intact": result.intact,
                    "seals": result.seals,
                    "first_altered": (
                        {"log": result.first_altered[0], "id": result.first_altered[1]}
                        if result.first_altered
                        else None
                    ),
                    "problems": result.problems,
                    "head": str(path) if head else None,
                }
            ).decode()
        )
    else:
        if head is None:
            typer.echo(
                "warning: --no-head: seals removed from the end would go unnoticed", err=True
            )
        if result.intact:
            checked = f", up to the head exported at {head.sealed_at}" if head else ""
            typer.echo(f"intact: {result.seals} seals match their rows{checked}")
        else:
            if result.first_altered:
                name, row_id = result.first_altered
                typer.echo(f"ALTERED: first altered row: {name} id {row_id}")
            for problem in result.problems:
                typer.echo(f"- {problem}")
    if not result.intact:
        raise typer.Exit(1)
