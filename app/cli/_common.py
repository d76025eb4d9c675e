"""What the command groups of `selfheal` share: failing with a message, settings, services,
one transaction against the database, printing a result, the signing key, option types.

The process helpers (fail, settings, services, migrations, SIGTERM) are defined in
app/startup.py, because the simulation runner needs them too and must not import app.cli;
they are re-exported here so that a command module imports its helpers from one place."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from app.core.errors import DomainError, Invalid
from app.core.settings import Settings
from app.releases.signing import Signer, SigningKeyError, load_signer
from app.startup import (
    describe,
    fail,
    load_settings,
    migrate_database,
    reporting_database_errors,
    running_services,
    terminate_on_sigterm,
)

__all__ = [
    "JsonOption",
    "describe",
    "fail",
    "load_settings",
    "migrate_database",
    "parse_id",
    "print_result",
    "reporting_database_errors",
    "reporting_domain_errors",
    "running_services",
    "signer_or_fail",
    "terminate_on_sigterm",
    "with_database",
]

T = TypeVar("T")

# `--json`: the result as one JSON object on stdout instead of aligned lines.
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object")]


def with_database(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(session)` in one transaction against the configured database."""
    # Imported here, not at the top: SQLAlchemy's async engine costs ~0.4 s that
    # `selfheal --help` and the commands without a database should not pay.
    from app.core.db import create_engine, create_sessionmaker

    async def main() -> T:
        engine = create_engine(settings, role="cli")
        try:
            async with create_sessionmaker(engine)() as session, session.begin():
                return await work(session)
        finally:
            await engine.dispose()

    with reporting_database_errors(settings), reporting_domain_errors():
        return asyncio.run(main())


@contextlib.contextmanager
def reporting_domain_errors() -> Iterator[None]:
    """Where the CLI maps a DomainError (app/core/errors.py): its message on stderr, exit code 2
    for invalid input (as for a usage error), 1 for the rest (not found, conflict, refused)."""
    try:
        yield
    except Invalid as exc:
        raise fail(exc.message) from None
    except DomainError as exc:
        raise fail(exc.message, code=1) from None


def parse_id(value: str, what: str) -> uuid.UUID:
    """A command-line argument that must be a UUID, or exit 2 naming `what` it should be."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise fail(f"{value!r} is not {what} (a UUID)") from None


def print_result(data: dict[str, Any], as_json: bool, note: str) -> None:
    """`data` as one JSON object on stdout (--json), or as aligned `key  value` lines followed
    by `note` on stderr."""
    if as_json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
        return
    width = max(len(key) for key in data)
    for key, value in data.items():
        typer.echo(f"{key.ljust(width)}  {value}")
    typer.echo(note, err=True)


def signer_or_fail(path: Path) -> Signer:
    """The release signing key at `path`, or exit 1 with the reason it cannot be used."""
    try:
        return load_signer(path)
    except SigningKeyError as exc:
        raise fail(str(exc), code=1) from None
