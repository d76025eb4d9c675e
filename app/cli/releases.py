"""`selfheal keys ...` and `selfheal release ...`: the release signing key, signed releases and
their quarantine (docs/contracts.md, "Command line")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer

from app.cli._common import (
    JsonOption,
    fail,
    load_settings,
    print_result,
    reporting_domain_errors,
    running_services,
    signer_or_fail,
    with_database,
)
from app.releases.signing import SigningKeyError, generate_key, key_path, load_signer

if TYPE_CHECKING:
    from app.releases.repository import ReleaseRow

keys_cli = typer.Typer(help="The release signing key (Ed25519).", no_args_is_help=True)
release_cli = typer.Typer(help="Signed plugin releases and quarantine.", no_args_is_help=True)

_PLUGIN = Annotated[str, typer.Option("--plugin", help="Plugin name")]
_VERSION = Annotated[str, typer.Option("--version", help="Plugin version")]


@keys_cli.command("generate")
def keys_generate(
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing key (plugins pinning the old key then refuse new releases)",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create the release signing key (if missing) and print the public key plugins pin.

    The key file is SELFHEAL_SIGNING_KEY_FILE, or keys/release-signing.pem under
    SELFHEAL_DATA_DIR. Keep it on the release manager's machine: only `release add` uses it."""
    path = key_path(load_settings()).absolute()
    created = True
    try:
        if path.exists() and not force:
            created = False
            signer = load_signer(path)
        else:
            signer = generate_key(path, force=force)
    except SigningKeyError as exc:
        raise fail(f"{exc}; `selfheal keys generate --force` replaces it", code=1) from None
    except FileExistsError:  # created by a concurrent `keys generate` since we looked
        raise fail(f"{path} appeared meanwhile; run the command again", code=1) from None
    except OSError as exc:
        raise fail(f"cannot write the key file {path}: {exc}", code=1) from None
    print_result(
        {"public_key": signer.public_key_b64, "key_file": str(path), "created": created},
        as_json,
        (
            "Pin this public key in every plugin (base64 of the raw Ed25519 public key)."
            " Keep the key file on the release manager's machine only."
            if created
            else "The key exists already and was not changed (--force replaces it)."
        ),
    )


def _release_json(release: ReleaseRow) -> dict[str, Any]:
    expires_at = release.expires_at
    return {
        "plugin": release.plugin_name,
        "version": release.version,
        "artifact_url": release.artifact_url,
        "sha256": release.sha256,
        "expires_at": expires_at.isoformat() if expires_at else None,
        "created_at": release.created_at.isoformat(),
        "quarantined_at": release.quarantined_at.isoformat() if release.quarantined_at else None,
        "quarantine_reason": release.quarantine_reason,
    }


@release_cli.command("add")
def release_add(
    plugin: _PLUGIN,
    version: _VERSION,
    artifact: Annotated[
        Path, typer.Option("--artifact", help="The artifact file (hashed and signed)")
    ],
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="An http(s) URL plugins download it from (default: the control plane keeps"
            " the bytes and serves them; required above SELFHEAL_ARTIFACT_MAX_BYTES)",
        ),
    ] = None,
    valid_days: Annotated[
        int, typer.Option("--valid-days", min=1, max=3650, help="Days the signature is valid")
    ] = 365,
    renew: Annotated[
        bool,
        typer.Option("--renew", help="Sign an existing release again (a new expiry)"),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Hash ARTIFACT, sign (plugin, version, sha256, expiry) and record the release.

    Adding the same artifact again changes nothing (unless its signature expired, was made by
    another key, or --renew); a different artifact under a released version is refused."""
    # Imported here, not at the top: the service loads SQLAlchemy (~0.5 s) that
    # `selfheal --help` and `keys generate` should not pay.
    from app.releases.service import add_release, check_release

    with reporting_domain_errors():
        check_release(plugin, version)
    if not artifact.is_file():
        raise fail(f"--artifact {artifact}: no such file")
    settings = load_settings()
    signer = signer_or_fail(key_path(settings))
    with running_services(settings, redis=False, secret_key=False) as settings:
        added = with_database(
            settings,
            lambda s: add_release(
                s,
                signer,
                plugin=plugin,
                version=version,
                artifact=artifact,
                url=url,
                valid_days=valid_days,
                renew=renew,
                max_bytes=settings.artifact_max_bytes,
            ),
        )
    data = _release_json(added.release)
    del data["quarantined_at"], data["quarantine_reason"], data["created_at"]
    print_result(
        {**data, "status": added.outcome, "public_key": signer.public_key_b64},
        as_json,
        {
            "added": "Release recorded; the healing loop may now propose it.",
            "unchanged": "This release exists with the same artifact and a valid signature.",
            "updated": "Release updated (signed again and/or new URL); same artifact.",
        }[added.outcome],
    )


@release_cli.command("list")
def release_list(
    plugin: Annotated[str | None, typer.Option("--plugin", help="Only this plugin")] = None,
    as_json: JsonOption = False,
) -> None:
    """Releases, newest version first per plugin, with expiry and quarantine."""
    # Imported here, not at the top: SQLAlchemy (~0.3 s), as in release_add.
    from app.releases.repository import list_releases

    with running_services(load_settings(), redis=False, secret_key=False) as settings:
        rows = with_database(settings, lambda s: list_releases(s, plugin))
    releases = [_release_json(row) for row in rows]
    if as_json:
        sys.stdout.write(orjson.dumps({"releases": releases}).decode() + "\n")
        return
    if not releases:
        typer.echo("no releases", err=True)
        return
    for item in releases:
        state = (
            f"quarantined: {item['quarantine_reason']}" if item["quarantined_at"] else "available"
        )
        typer.echo(
            f"{item['plugin']}  {item['version']}  sha256 {item['sha256'][:12]}"
            f"  expires {item['expires_at'] or 'unreadable statement'}  {state}"
            f"  {item['artifact_url']}"
        )


def _quarantine_change(plugin: str, version: str, reason: str | None, as_json: bool) -> None:
    """Quarantine (`reason` given) or release from quarantine one release, and say what
    changed."""
    # Imported here, not at the top: SQLAlchemy (~0.3 s), as in release_add.
    from app.releases import repository

    async def work(session: Any) -> tuple[bool, ReleaseRow | None]:
        if reason is None:
            changed = await repository.unquarantine(session, plugin, version)
        else:
            changed = await repository.quarantine(session, plugin, version, reason)
        return changed, await repository.get_release(session, plugin, version)

    with running_services(load_settings(), redis=False, secret_key=False) as settings:
        changed, release = with_database(settings, work)
    if release is None:
        raise fail(f"no release {plugin} {version} (see `selfheal release list`)", code=1)
    print_result(
        {
            "plugin": plugin,
            "version": version,
            "quarantined": release.quarantined_at is not None,
            "changed": changed,
            "quarantine_reason": release.quarantine_reason,
        },
        as_json,
        ("Done." if changed else "Nothing to change: it already was in that state.")
        + (
            " The healing loop no longer proposes this version automatically."
            if release.quarantined_at is not None
            else ""
        ),
    )


@release_cli.command("quarantine")
def release_quarantine(
    plugin: _PLUGIN,
    version: _VERSION,
    reason: Annotated[str, typer.Option("--reason", help="Why (shown to operators)")],
    as_json: JsonOption = False,
) -> None:
    """Stop the healing loop from choosing this version automatically (an operator may still
    apply it by hand)."""
    if not reason.strip():
        raise fail("--reason must not be empty")
    _quarantine_change(plugin, version, reason.strip(), as_json)


@release_cli.command("unquarantine")
def release_unquarantine(plugin: _PLUGIN, version: _VERSION, as_json: JsonOption = False) -> None:
    """Make a quarantined version a candidate again."""
    _quarantine_change(plugin, version, None, as_json)
