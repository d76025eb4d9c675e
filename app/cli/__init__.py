"""The `selfheal` command line (docs/contracts.md, "Command line"): the Typer app and `main()`.

One module per command group, each registered here:

- services.py: `up`, `api`, `worker`, `migrate`
- simulate.py: `simulate`
- plugins.py: `plugin register`, `plugin rotate-secret`
- users.py: `user add`
- releases.py: `keys generate`, `release add|list|quarantine|unquarantine`
- notifications.py: `notify add|list|disable`
- keyring.py: `secrets rotate-key`
- audit.py: `audit seal`, `audit verify`
- _common.py: what they share (fail, settings, services, one transaction, printing, options)

The command modules import heavy modules (SQLAlchemy, the domain services, the worker, the
simulator) inside the commands that use them, each with a comment: every command module is
loaded at start-up to build the app, and `selfheal --help` or `keys generate` should not pay
a second of imports for commands they do not run.

`python -m app.cli ...` runs __main__.py; `up` and the simulator start their workers and APIs
that way."""

from __future__ import annotations

import typer

from app.cli import audit, keyring, notifications, plugins, releases, services, simulate, users
from app.core.migrations import REPO_ROOT, run_migrations

# tests/ and bench/ import these two from here (they lived in the former app/cli.py).
__all__ = ["REPO_ROOT", "cli", "main", "run_migrations"]

cli = typer.Typer(
    help="selfheal: a self-healing incident control plane for plugins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Top-level commands, in the order `selfheal --help` lists them; then the groups.
cli.command()(services.up)
cli.command()(services.api)
cli.command()(services.worker)
cli.command()(simulate.simulate)
cli.command()(services.migrate)
cli.add_typer(plugins.plugin_cli, name="plugin")
cli.add_typer(users.user_cli, name="user")
cli.add_typer(releases.keys_cli, name="keys")
cli.add_typer(releases.release_cli, name="release")
cli.add_typer(notifications.notify_cli, name="notify")
cli.add_typer(keyring.secrets_cli, name="secrets")
cli.add_typer(audit.audit_cli, name="audit")


def main() -> None:
    cli()
