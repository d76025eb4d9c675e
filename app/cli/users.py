"""`selfheal user add`, `user issue-token`, `user revoke-token`: ops users and their API
tokens (each expires: SELFHEAL_TOKEN_TTL_DAYS, or --days)."""

from __future__ import annotations

from datetime import UTC, datetime
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

# --days: the lifetime of the token a command issues.
DaysOption = Annotated[
    int | None,
    typer.Option(
        "--days",
        min=1,
        max=3650,
        help="Days the API token is valid (default: SELFHEAL_TOKEN_TTL_DAYS, 90)",
    ),
]


@user_cli.command("add")
def user_add(
    username: Annotated[str, typer.Argument(help="Login name")],
    role: Annotated[str, typer.Option(help="viewer | operator | admin")] = "viewer",
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            "--tenant",
            help="Limit the user to this tenant (repeat for several); without it, every tenant."
            " A scoped user is a viewer or an operator, never an admin.",
        ),
    ] = None,
    days: DaysOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an ops user; prints a generated password and an API token (shown once)."""
    # Imported here, not at the top: argon2 and SQLAlchemy (~1 s) that `selfheal --help` and
    # the other commands should not pay.
    from app.ops.security import add_user

    if role not in ("viewer", "operator", "admin"):
        raise fail("--role must be one of viewer, operator, admin")
    with running_services(load_settings(), redis=False, secret_key=False) as settings:
        token_days = days or settings.token_ttl_days
        try:
            user = with_database(
                settings,
                lambda s: add_user(s, username, role, tenants=tenant, token_days=token_days),
            )
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
            "tenants": (
                (list(user.tenants) if user.tenants is not None else None)
                if as_json
                else ", ".join(user.tenants or ()) or "all"
            ),
            "password": user.password,
            "token": user.token,
            "token_expires_at": _when(user.token_expires_at),
        },
        as_json,
        "Store the password and token now: they are not shown again.",
    )


@user_cli.command("issue-token")
def issue_token(
    username: Annotated[str, typer.Argument(help="The ops user")],
    days: DaysOption = None,
    as_json: JsonOption = False,
) -> None:
    """A new API token for an ops user (shown once), e.g. when theirs expired; their other
    tokens stay valid (revoke them with `revoke-token`)."""
    # Imported here, not at the top: argon2 and SQLAlchemy (see user_add).
    from app.core.logging import configure_logging
    from app.ops.security import issue_token as issue

    with running_services(load_settings(), redis=False, secret_key=False) as settings:
        configure_logging(settings.log_level)  # on stderr: stdout is the result's
        token_days = days or settings.token_ttl_days
        issued = with_database(settings, lambda s: issue(s, username, days=token_days))
    print_result(
        {
            "username": issued.username,
            "token": issued.token,
            "token_expires_at": _when(issued.expires_at),
        },
        as_json,
        "Store the token now: it is not shown again.",
    )


@user_cli.command("revoke-token")
def revoke_token(
    username: Annotated[str, typer.Argument(help="The ops user")],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Revoke this token only (its value); without it, every live token of the user",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke an ops user's API tokens (or one of them): their next request gets 401. The
    user's password and dashboard sign-in are untouched (`/ops/users` disables a user)."""
    # Imported here, not at the top: argon2 and SQLAlchemy (see user_add).
    from app.core.logging import configure_logging
    from app.ops.security import revoke_tokens_of

    with running_services(load_settings(), redis=False, secret_key=False) as settings:
        configure_logging(settings.log_level)  # on stderr: stdout is the result's
        revoked = with_database(settings, lambda s: revoke_tokens_of(s, username, token))
    print_result(
        {"username": username, "tokens_revoked": revoked},
        as_json,
        f"{username} has no live API token left." if token is None else "",
    )


def _when(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None
