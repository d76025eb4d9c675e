"""`selfheal plugin register` and `selfheal plugin rotate-secret`: installations and their
signing secrets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.cli._common import (
    JsonOption,
    fail,
    load_settings,
    parse_id,
    print_result,
    reporting_domain_errors,
    running_services,
    signer_or_fail,
    with_database,
)
from app.core.crypto import SecretBox
from app.releases.signing import key_path

if TYPE_CHECKING:
    from app.releases.service import AddedRelease

plugin_cli = typer.Typer(
    help="Plugin installations and their signing secrets.", no_args_is_help=True
)


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
    as_json: JsonOption = False,
) -> None:
    """Register an installation; prints its id and signing secret (shown once)."""
    # Imported here, not at the top: the services load SQLAlchemy (~0.5 s) that
    # `selfheal --help` and the other commands should not pay.
    from app.plugins.service import check_registration, register_installation
    from app.releases.service import add_release

    with reporting_domain_errors():
        check_registration(tenant, name, version, env)
    if artifact is not None and not artifact.is_file():
        raise fail(f"--artifact {artifact}: no such file")
    settings = load_settings()
    signer = signer_or_fail(key_path(settings)) if artifact is not None else None
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
        box = SecretBox.for_settings(settings)
        issued = with_database(settings, register)
    release = {"release": added[0].outcome, "sha256": added[0].release.sha256} if added else {}
    print_result(
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
    as_json: JsonOption = False,
) -> None:
    """Issue a new secret; the old one stays valid for the grace period."""
    # Imported here, not at the top: SQLAlchemy (~0.5 s), as in plugin_register.
    from app.plugins.service import rotate_secret

    installation_id = parse_id(plugin_id, "an installation id")
    with running_services(load_settings(), redis=False) as settings:
        grace = settings.secret_grace_s if grace_s is None else grace_s
        box = SecretBox.for_settings(settings)
        issued = with_database(
            settings, lambda s: rotate_secret(s, box, installation_id, grace_s=grace)
        )
    print_result(
        {
            "plugin_id": str(issued.plugin_id),
            "secret": issued.secret,
            "old_secret_valid_for_s": grace,
        },
        as_json,
        "Store the new secret now: it is not shown again.",
    )
