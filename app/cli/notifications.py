"""`selfheal notify ...`: notification endpoints from the command line."""

from __future__ import annotations

import sys
from typing import Annotated

import orjson
import typer

from app.cli._common import (
    JsonOption,
    load_settings,
    parse_id,
    print_result,
    reporting_domain_errors,
    running_services,
    with_database,
)
from app.core.crypto import SecretBox

notify_cli = typer.Typer(
    help="Notification webhooks (ops and tenant endpoints) and their signing secrets.",
    no_args_is_help=True,
)


@notify_cli.command("add")
def notify_add(
    url: Annotated[str, typer.Option(help="http(s) URL that receives signed JSON POSTs")],
    tenant: Annotated[
        str | None,
        typer.Option(help="Tenant whose incidents it receives (default: an ops endpoint)"),
    ] = None,
    events: Annotated[
        str | None,
        typer.Option(help="Comma-separated events to receive (default: all)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Add an endpoint; prints its id and signing secret (shown once)."""
    # Imported here, not at the top: the service loads SQLAlchemy (~0.5 s) that
    # `selfheal --help` and the other commands should not pay.
    from app.notifications.egress import WebhookPolicy
    from app.notifications.service import add_endpoint, parse_events

    loaded = load_settings()
    with reporting_domain_errors():
        policy = WebhookPolicy.from_settings(loaded)
        policy.check_url_syntax(url)
        names = parse_events(events)
    with running_services(loaded, redis=False) as settings:
        box = SecretBox.for_settings(settings)
        issued = with_database(
            settings,
            lambda s: add_endpoint(s, box, url=url, policy=policy, tenant_id=tenant, events=names),
        )
    endpoint = issued.endpoint
    data = {
        "id": str(endpoint.id),
        "secret": issued.secret,
        "url": endpoint.url,
        "tenant": endpoint.tenant_id,
        "events": endpoint.events,
    }
    if not as_json:
        data |= {
            "tenant": endpoint.tenant_id or "(ops: every incident)",
            "events": ",".join(endpoint.events) or "(all)",
        }
    print_result(
        data,
        as_json,
        "Store the secret now: it is not shown again. Receivers verify X-Selfheal-Signature"
        " with it (README, Notifications).",
    )


@notify_cli.command("list")
def notify_list(as_json: JsonOption = False) -> None:
    """List endpoints (enabled first); secrets are never shown again."""
    # Imported here, not at the top: SQLAlchemy (~0.5 s), as in notify_add.
    from app.notifications.service import list_endpoints

    with running_services(load_settings(), redis=False) as settings:
        endpoints = with_database(settings, list_endpoints)
    if as_json:
        items = [endpoint.as_json() for endpoint in endpoints]
        sys.stdout.write(orjson.dumps({"endpoints": items}).decode() + "\n")
        return
    if not endpoints:
        typer.echo("no notification endpoints (add one with `selfheal notify add`)", err=True)
        return
    for endpoint in endpoints:
        state = f"disabled {endpoint.disabled_at:%Y-%m-%d %H:%M}" if endpoint.disabled_at else "on"
        typer.echo(
            f"{endpoint.id}  {state:<24}  {endpoint.tenant_id or '(ops)':<20}  "
            f"{','.join(endpoint.events) or '(all)':<30}  {endpoint.url}"
        )


@notify_cli.command("disable")
def notify_disable(
    endpoint_id: Annotated[str, typer.Argument(help="Endpoint id")],
) -> None:
    """Stop notifying an endpoint; deliveries still waiting for it are given up."""
    # Imported here, not at the top: SQLAlchemy (~0.5 s), as in notify_add.
    from app.notifications.service import disable_endpoint

    parsed = parse_id(endpoint_id, "an endpoint id")
    with running_services(load_settings(), redis=False) as settings:
        _, dropped = with_database(settings, lambda s: disable_endpoint(s, parsed))
    plural = "y" if dropped == 1 else "ies"
    typer.echo(f"endpoint {parsed} disabled ({dropped} pending deliver{plural} given up)")
