"""`selfheal user add`: ops users and their API tokens."""

from __future__ import annotations

from typing import Annotated

import typer

from app.cli._common import (
    JsonOption,
    fail,
    load_settings,
    print_result,
    running_services,
    with_database,
)

user_cli = typer.Typer(help="Ops users and their API tokens.", no_args_is_help=True)


@user_cli.command("add")
def user_add(
    username: Annotated[str, typer.Argument(help="Login name")],
    role: Annotated[str, typer.Option(help="viewer | operator | admin")] = "viewer",
    as_json: JsonOption = False,
) -> None:
    """Create an ops user; prints a generated password and an API token (shown once)."""
    # Imported here, not at the top: argon2 and SQLAlchemy (~1 s) that `selfheal --help` and
    # the other commands should not pay.
    from app.ops.security import add_user

    if role not in ("viewer", "operator", "admin"):
        raise fail("--role must be one of viewer, operator, admin")
    with running_services(load_settings(), redis=False) as settings:
        try:
            user = with_database(settings, lambda s: add_user(s, username, role))
        except Exception as exc:
            if "ck_ops_users_username" in str(exc):
                raise fail(
                    f"{username!r} is not a valid user name (letters, digits, ._@-)"
                ) from None
            raise
    print_result(
        {
            "username": user.username,
            "role": user.role,
            "password": user.password,
            "token": user.token,
        },
        as_json,
        "Store the password and token now: they are not shown again.",
    )
