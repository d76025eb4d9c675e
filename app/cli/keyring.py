"""`selfheal secrets rotate-key`: every stored secret sealed again under SELFHEAL_SECRET_KEY
(README, Security, "Rotating SELFHEAL_SECRET_KEY")."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli._common import (
    JsonOption,
    fail,
    load_settings,
    print_result,
    reporting_database_errors,
    running_services,
)
from app.core.settings import Settings

if TYPE_CHECKING:
    from app.keyring.service import Rotation

secrets_cli = typer.Typer(
    help="The key that encrypts the stored secrets (SELFHEAL_SECRET_KEY).", no_args_is_help=True
)


@secrets_cli.command("rotate-key")
def rotate_key(
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per transaction")] = 500,
    as_json: JsonOption = False,
) -> None:
    """Seal every stored secret (plugin and notification endpoint secrets) again under
    SELFHEAL_SECRET_KEY, opening the old ones with SELFHEAL_SECRET_KEY_PREVIOUS. Safe beside a
    running API and safe to run again; exit 1 while secrets no configured key opens remain."""
    with running_services(load_settings(), redis=False) as settings:
        rotation = reseal_stored_secrets(settings, batch_size=batch_size)
    print_result(
        {
            "key_id": rotation.key_id,
            "plugin_secrets_resealed": rotation.plugin_secrets,
            "endpoint_secrets_resealed": rotation.endpoint_secrets,
            "unreadable": rotation.unreadable if as_json else ", ".join(rotation.unreadable),
            "remaining": rotation.remaining,
        },
        as_json,
        "Every stored secret is sealed under SELFHEAL_SECRET_KEY: SELFHEAL_SECRET_KEY_PREVIOUS"
        " can be removed (then restart the API and the workers)."
        if rotation.remaining == 0
        else "",
    )
    if rotation.remaining:
        raise fail(
            f"{rotation.remaining} stored secret(s) are not sealed under SELFHEAL_SECRET_KEY"
            + (
                f"; no configured key opens {', '.join(rotation.unreadable)}: add the key they"
                " were sealed under to SELFHEAL_SECRET_KEY_PREVIOUS and run this again, or"
                " issue those installations new secrets (`selfheal plugin rotate-secret ID"
                " --grace-s 0`) and add those notification endpoints again"
                if rotation.unreadable
                else " (written meanwhile by a process on the old key?): run this again"
            ),
            code=1,
        )


def reseal_stored_secrets(settings: Settings, *, batch_size: int = 500) -> Rotation:
    """`app.keyring.service.rotate_key` against the configured database."""
    # Imported here, not at the top: SQLAlchemy and the domain (~0.5 s) that `selfheal --help`
    # and the other commands should not pay.
    from app.core.crypto import SecretBox
    from app.core.db import create_engine, create_sessionmaker
    from app.core.logging import configure_logging
    from app.keyring.service import rotate_key as rotate

    configure_logging(settings.log_level)  # on stderr: stdout is the result's

    async def main() -> Rotation:
        engine = create_engine(settings, role="cli")
        try:
            return await rotate(
                create_sessionmaker(engine), SecretBox.for_settings(settings), batch_size=batch_size
            )
        finally:
            await engine.dispose()

    with reporting_database_errors(settings):
        return asyncio.run(main())
