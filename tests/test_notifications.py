"""Notifications and decision-service feedback through the outbox: real PostgreSQL, a real
HTTP receiver on loopback (a raw asyncio server that records every request and answers as
told), the reference decision service as a real process, and the `selfheal notify` command
line as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import random
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from psycopg.rows import dict_row
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.crypto import SecretBox
from app.core.db import create_engine, create_sessionmaker
from app.core.errors import Invalid, domain_status
from app.core.settings import Settings
from app.decisions.breaker import CircuitBreaker
from app.decisions.client import DecisionClient
from app.decisions.schemas import Feedback
from app.notifications.delivery import DeliveryResult, deliver_due
from app.notifications.egress import WebhookClient, WebhookPolicy, webhook_client
from app.notifications.events import EVENTS, notify, summary_text
from app.notifications.feedback import record_outcome
from app.notifications.service import IssuedEndpoint, add_endpoint, disable_endpoint
from app.notifications.signing import verify
from tests.support.cli import SELFHEAL
from tests.support.fakes import Receiver
from tests.support.plugins import Plugin, register
from tests.support.ports import free_port
from tests.support.services import SIRA_TOKEN, Server
from tests.support.settings import settings_env

INCIDENT = {
    "id": "6f1c7d1e-0000-4000-8000-000000000001",
    "type": "error_spike",
    "severity": "high",
    "status": "rolled_back",
    "status_reason": "attempt rolled back",
    "tenant_id": "acme",
    "installation_id": "6f1c7d1e-0000-4000-8000-0000000000aa",
    "plugin_name": "payments",
    "plugin_version": "1.2.2",
    "detected_at": "2026-12-03T10:00:00+00:00",
    "telemetry_snapshot": {"secret": "not for receivers"},
}
ATTEMPT = {
    "id": "6f1c7d1e-0000-4000-8000-0000000000bb",
    "action": "patch",
    "from_version": "1.2.1",
    "to_version": "1.2.3",
    "status": "rolled_back",
    "failure_reason": None,
    "rollback_reason": "health check failed",
}


# --- a webhook receiver ----------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
async def maker(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings, role="test")
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def webhooks(settings: Settings) -> AsyncIterator[WebhookClient]:
    """The worker's webhook client, with the tests' settings (loopback allow-listed)."""
    client = webhook_client(WebhookPolicy.from_settings(settings))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def box(settings: Settings) -> SecretBox:
    return SecretBox(settings.secret_key)


@pytest.fixture
def tenants(db: Any) -> None:
    db.execute("INSERT INTO tenants (id) VALUES ('acme'), ('globex')")


async def add(
    maker: async_sessionmaker[AsyncSession],
    box: SecretBox,
    url: str,
    *,
    tenant: str | None = None,
    events: list[str] | None = None,
    policy: WebhookPolicy | None = None,
) -> IssuedEndpoint:
    """An endpoint, checked by `policy` (default: loopback allowed, as in the tests' settings)."""
    async with maker() as session, session.begin():
        return await add_endpoint(
            session,
            box,
            url=url,
            policy=policy or WebhookPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1"),)),
            tenant_id=tenant,
            events=events,
        )


async def emit(
    maker: async_sessionmaker[AsyncSession],
    event: str,
    incident: dict[str, Any] | None = None,
    attempt: dict[str, Any] | None = None,
    detail: str | None = None,
) -> int:
    async with maker() as session, session.begin():
        return await notify(
            session, event, incident=incident or INCIDENT, attempt=attempt, detail=detail
        )


async def deliver(
    maker: async_sessionmaker[AsyncSession],
    webhooks: WebhookClient,
    box: SecretBox,
    **options: Any,
) -> DeliveryResult:
    options.setdefault("decision_client", None)
    options.setdefault("request_timeout_s", 2.0)
    return await deliver_due(maker, webhooks, box, **options)


def outbox(db: Any) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        return list(
            cur.execute(
                "SELECT *, next_attempt_at - now() AS due_in FROM outbox ORDER BY id"
            ).fetchall()
        )


def make_due(db: Any) -> None:
    """Pretend the backoff has passed."""
    db.execute("UPDATE outbox SET next_attempt_at = now() WHERE delivered_at IS NULL")


# --- fan-out ---------------------------------------------------------------------------------


async def test_fan_out_reaches_ops_and_the_incidents_tenant_filtered_by_event(
    maker, webhooks, box, receiver, tenants, db
) -> None:
    await add(maker, box, receiver.url("/ops-all"))
    await add(maker, box, receiver.url("/ops-escalations"), events=["escalated"])
    await add(maker, box, receiver.url("/acme"), tenant="acme")
    await add(maker, box, receiver.url("/acme-success"), tenant="acme", events=["patch_succeeded"])
    await add(maker, box, receiver.url("/globex"), tenant="globex")
    off = await add(maker, box, receiver.url("/acme-off"), tenant="acme")
    async with maker() as session, session.begin():
        await disable_endpoint(session, off.endpoint.id)

    assert await emit(maker, "rolled_back", attempt=ATTEMPT) == 2  # ops-all, acme
    assert await emit(maker, "escalated") == 3  # + ops-escalations
    fleet = INCIDENT | {"tenant_id": None, "installation_id": None}
    assert await emit(maker, "incident_opened", fleet) == 1  # ops only

    result = await deliver(maker, webhooks, box)
    assert result == DeliveryResult(delivered=6)
    got = {(r.path, r.headers["x-selfheal-event"]) for r in receiver.requests}
    assert got == {
        ("/ops-all", "rolled_back"),
        ("/acme", "rolled_back"),
        ("/ops-all", "escalated"),
        ("/ops-escalations", "escalated"),
        ("/acme", "escalated"),
        ("/ops-all", "incident_opened"),
    }
    assert not receiver.to("/globex") and not receiver.to("/acme-off")
    assert all(row["delivered_at"] is not None and row["attempts"] == 1 for row in outbox(db))


async def test_nobody_listening_queues_nothing_and_unknown_events_are_refused(maker) -> None:
    assert await emit(maker, "escalated") == 0
    with pytest.raises(ValueError, match="unknown notification event"):
        await emit(maker, "incident_exploded")


async def test_payload_headers_and_summary_line(maker, webhooks, box, receiver, tenants) -> None:
    issued = await add(maker, box, receiver.url("/hook"), tenant="acme")
    await emit(maker, "rolled_back", attempt=ATTEMPT, detail="p95 latency 2400 ms <2x>")
    await deliver(maker, webhooks, box)
    [request] = receiver.requests
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-selfheal-event"] == "rolled_back"
    delivery_id = request.headers["x-selfheal-delivery"]
    assert abs(int(request.headers["x-selfheal-timestamp"]) - time.time()) < 10
    body = request.json
    assert list(body)[:2] == ["event", "delivery_id"]
    assert body["event"] == "rolled_back" and body["delivery_id"] == delivery_id
    assert body["incident"] == {k: v for k, v in INCIDENT.items() if k != "telemetry_snapshot"}
    assert body["attempt"] == ATTEMPT
    assert body["detail"] == "p95 latency 2400 ms <2x>"
    assert body["occurred_at"].endswith("+00:00")
    assert body["text"] == (
        ":rewind: [high] error_spike on acme/payments 1.2.2: rolled back to 1.2.1"
        " (health check failed)"
    )
    assert verify(
        issued.secret,
        timestamp=request.headers["x-selfheal-timestamp"],
        signature=request.headers["x-selfheal-signature"],
        body=request.body,
    )


def test_summary_lines_for_every_event() -> None:
    incident = {k: v for k, v in INCIDENT.items() if k != "status_reason"}
    lines = {
        event: summary_text(event, incident, ATTEMPT if event != "incident_opened" else None, None)
        for event in EVENTS
    }
    assert lines == {
        "incident_opened": ":rotating_light: [high] error_spike on acme/payments 1.2.2:"
        " incident opened",
        "approval_needed": ":raised_hand: [high] error_spike on acme/payments 1.2.2:"
        " approval needed to patch to 1.2.3",
        "patch_succeeded": ":white_check_mark: [high] error_spike on acme/payments 1.2.2:"
        " patched to 1.2.3, healthy",
        "patch_failed": ":x: [high] error_spike on acme/payments 1.2.2: patch to 1.2.3 failed",
        "rolled_back": ":rewind: [high] error_spike on acme/payments 1.2.2: rolled back to"
        " 1.2.1 (health check failed)",
        "escalated": ":sos: [high] error_spike on acme/payments 1.2.2: escalated to ops",
        "cancelled": ":no_entry_sign: [high] error_spike on acme/payments 1.2.2: cancelled",
    }
    rollback = ATTEMPT | {"action": "rollback", "to_version": "1.2.1"}
    assert summary_text("patch_failed", incident, rollback, None).endswith(
        ": rollback to 1.2.1 failed"
    )
    fleet = summary_text("escalated", incident | {"tenant_id": None}, None, "a\nb & <@here>")
    assert fleet == (
        ":sos: [high] error_spike on payments (fleet) 1.2.2: escalated to ops"
        " (a b &amp; &lt;@here&gt;)"
    )


# --- the command line and the signature ------------------------------------------------------


@pytest.fixture
def selfheal(settings: Settings, tmp_path: Path):
    base = settings_env(settings)
    for name in ("SIRA_API_URL", "STAGING_RUNNER_URL", "PORT"):
        base.pop(name, None)

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SELFHEAL, "notify", *args],
            env=base | (env or {}),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


async def test_cli_add_list_disable_and_the_printed_secret_verifies(
    selfheal, maker, webhooks, box, receiver, tenants, db
) -> None:
    added = selfheal(
        "add", "--url", receiver.url("/ops"), "--events", "escalated,rolled_back", "--json"
    )
    assert added.returncode == 0, added.stderr
    ops = orjson.loads(added.stdout)
    assert ops["events"] == ["escalated", "rolled_back"] and ops["tenant"] is None
    tenant = selfheal("add", "--url", receiver.url("/acme"), "--tenant", "acme")
    assert tenant.returncode == 0, tenant.stderr
    assert "secret" in tenant.stdout and "not shown again" in tenant.stderr
    # Nothing readable at rest.
    stored = db.execute("SELECT secret_enc FROM notification_endpoints").fetchall()
    assert all(ops["secret"].encode() not in bytes(row[0]) for row in stored)

    await emit(maker, "escalated", detail="no release to try")
    await deliver(maker, webhooks, box)
    [request] = receiver.to("/ops")
    timestamp = request.headers["x-selfheal-timestamp"]
    # What a receiver in any language does, by hand.
    expected = hmac.new(
        ops["secret"].encode(), timestamp.encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    assert request.headers["x-selfheal-signature"] == f"v1={expected}"
    assert verify(ops["secret"], timestamp=timestamp, signature=f"v1={expected}", body=request.body)
    assert not verify(
        ops["secret"], timestamp=timestamp, signature=f"v1={expected}", body=request.body + b" "
    )
    assert not verify(
        ops["secret"],
        timestamp=str(int(timestamp) - 301),
        signature=f"v1={expected}",
        body=request.body,
    )
    assert len(receiver.to("/acme")) == 1

    listed = selfheal("list", "--json")
    assert listed.returncode == 0, listed.stderr
    endpoints = orjson.loads(listed.stdout)["endpoints"]
    assert [(e["url"], e["tenant"], e["events"], e["disabled_at"]) for e in endpoints] == [
        (receiver.url("/ops"), None, ["escalated", "rolled_back"], None),
        (receiver.url("/acme"), "acme", [], None),
    ]
    assert "secret" not in listed.stdout

    disabled = selfheal("disable", ops["id"])
    assert disabled.returncode == 0, disabled.stderr
    assert "disabled" in disabled.stdout
    endpoints = orjson.loads(selfheal("list", "--json").stdout)["endpoints"]
    assert [e["disabled_at"] is not None for e in endpoints] == [False, True]
    assert await emit(maker, "escalated") == 1  # the tenant's only

    text_list = selfheal("list")
    assert text_list.returncode == 0 and "(ops)" in text_list.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["add", "--url", "ftp://example.com/x"], 2, "not an http:// or https:// URL"),
        (["add", "--url", "http://"], 2, "URL"),
        (
            ["add", "--url", "https://example.com", "--events", "escalated,explosion"],
            2,
            "unknown event 'explosion'",
        ),
        (["add", "--url", "https://example.com", "--tenant", "nobody"], 1, "no tenant 'nobody'"),
        (["disable", "not-a-uuid"], 2, "not an endpoint id"),
        (["disable", str(uuid.UUID(int=7))], 1, "no notification endpoint"),
    ],
)
def test_cli_refusals(selfheal, args: list[str], code: int, message: str) -> None:
    result = selfheal(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr


# --- where webhooks may go (SSRF) --------------------------------------------------------------

PUBLIC = "93.184.215.14"  # a public address (nothing is sent there: the tests resolve names)


def at_defaults(settings: Settings, **changes: Any) -> WebhookPolicy:
    """The policy of an installation that allow-lists nothing (the tests' settings allow
    loopback for their receivers)."""
    return WebhookPolicy.from_settings(settings.model_copy(update={"webhook_allow": "", **changes}))


class Names:
    """A resolver the test controls: what each name resolves to now, and every lookup."""

    def __init__(self, **names: list[str]) -> None:
        self.names = {name.replace("_", "."): found for name, found in names.items()}
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.names:
            raise OSError(f"no such name {host}")
        return self.names[host]


@contextlib.contextmanager
def listening_socket() -> Any:
    """A socket listening on loopback that accepts nothing by itself: a connection attempt
    completes in the kernel's backlog, and `accept` then finds it."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def connections(sock: Any) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:9000/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://10.0.0.1/hook", "private"),
        ("http://[::1]:8080/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://[::ffff:169.254.169.254]/hook", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[fd00::1]/hook", "private"),
        ("http://172.16.5.4/hook", "private"),
        ("http://192.168.1.1/hook", "private"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://240.0.0.1/hook", "private"),
        ("http://localhost:9000/hook", "loopback"),  # a name, resolved by the system
        ("http://2130706433/hook", "loopback"),  # 127.0.0.1 as one decimal number
    ],
)
async def test_webhooks_to_internal_addresses_are_refused_at_creation(
    settings, maker, box, db, url, why
) -> None:
    with pytest.raises(Invalid) as refused:
        await add(maker, box, url, policy=at_defaults(settings))
    assert domain_status(refused.value) == (422, "validation_error")
    assert refused.value.field == "url"
    assert why in refused.value.message and "SELFHEAL_WEBHOOK_ALLOW" in refused.value.message
    assert db.execute("SELECT count(*) FROM notification_endpoints").fetchone() == (0,)


async def test_a_name_resolving_to_an_internal_address_is_refused_at_creation(
    settings, maker, box, db
) -> None:
    names = Names(hooks_acme_test=[PUBLIC, "10.1.2.3"], metadata_test=["169.254.169.254"])
    policy = WebhookPolicy.from_settings(
        settings.model_copy(update={"webhook_allow": ""}), resolver=names
    )
    for url, why in [
        ("https://metadata.test/x", "metadata.test (169.254.169.254) is a link-local"),
        # One internal address among public ones is enough to refuse.
        ("https://hooks.acme.test/x", "hooks.acme.test (10.1.2.3) is a private"),
    ]:
        with pytest.raises(Invalid, match=re.escape(why)) as refused:
            await add(maker, box, url, policy=policy)
        assert refused.value.field == "url"
    with pytest.raises(Invalid, match="does not resolve"):
        await add(maker, box, "https://nowhere.test/x", policy=policy)
    assert db.execute("SELECT count(*) FROM notification_endpoints").fetchone() == (0,)


async def test_https_is_required_in_prod_and_the_allow_list_admits_internal_endpoints(
    settings, maker, box
) -> None:
    prod = at_defaults(settings, env="prod")
    with pytest.raises(Invalid, match=r"must be https:// \(SELFHEAL_ENV=prod\)") as refused:
        await add(maker, box, f"http://{PUBLIC}/hook", policy=prod)
    assert refused.value.field == "url"
    await add(maker, box, f"https://{PUBLIC}/hook", policy=prod)
    await add(maker, box, f"http://{PUBLIC}/hook", policy=at_defaults(settings))  # dev
    internal = WebhookPolicy.from_settings(
        settings.model_copy(update={"webhook_allow": "10.20.0.0/16, alerts.internal"}),
        resolver=Names(alerts_internal=["10.99.0.1"]),
    )
    await add(maker, box, "https://10.20.3.4/hook", policy=internal)
    await add(maker, box, "https://alerts.internal/hook", policy=internal)
    with pytest.raises(Invalid, match=re.escape("10.21.0.1 is a private")):
        await add(maker, box, "https://10.21.0.1/hook", policy=internal)
    with pytest.raises(ValueError, match="SELFHEAL_WEBHOOK_ALLOW"):
        settings.model_validate(
            {**settings.model_dump(), "webhook_allow": "10.0.0.0/8, not a host"}
        )


async def test_a_name_that_resolves_elsewhere_at_delivery_is_refused_before_connecting(
    settings, maker, box, db
) -> None:
    """DNS rebinding: public when the endpoint was added, loopback when the worker sends. The
    worker connects to the address it checked, so a listening socket on that loopback port
    sees no connection at all, and the delivery is given up with the reason."""
    names = Names(hooks_rebind_test=[PUBLIC])
    policy = WebhookPolicy(resolver=names)  # the defaults: nothing allow-listed
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        await add(maker, box, f"http://hooks.rebind.test:{port}/hook", policy=policy)
        await emit(maker, "escalated")
        names.names["hooks.rebind.test"] = ["127.0.0.1"]  # the attacker's DNS answer changes
        async with contextlib.aclosing(webhook_client(policy)) as client:
            assert await deliver(maker, client, box) == DeliveryResult(dead=1)
        assert connections(sock) == 0
    assert names.lookups == ["hooks.rebind.test", "hooks.rebind.test"]
    [row] = outbox(db)
    assert row["last_error"].startswith(
        "destination refused: hooks.rebind.test (127.0.0.1) is a loopback address"
    )
    assert row["attempts"] == 0 and row["dead_at"] is not None  # no request was made


async def test_each_connection_goes_to_the_checked_address_with_the_name_as_host(
    settings, maker, box, receiver
) -> None:
    """The guard resolves, checks, and connects to the address, not to the name: the request
    still names the URL's host (Host header; TLS would use it as server name)."""
    names = Names(hooks_acme_test=["127.0.0.1"])
    policy = WebhookPolicy(allow_networks=(ipaddress.ip_network("127.0.0.0/8"),), resolver=names)
    url = receiver.url("/hook").replace("127.0.0.1", "hooks.acme.test")
    await add(maker, box, url, policy=policy)
    await emit(maker, "escalated")
    async with contextlib.aclosing(webhook_client(policy)) as client:
        assert await deliver(maker, client, box) == DeliveryResult(delivered=1)
    [request] = receiver.to("/hook")
    assert request.headers["host"] == url.split("/")[2]
    assert names.lookups == ["hooks.acme.test", "hooks.acme.test"]


async def test_an_allowed_address_no_longer_allowed_is_refused_when_connecting(
    settings, maker, box, receiver, webhooks, db
) -> None:
    """Rows stored before the guard (or under a wider allow-list) are checked again when sent:
    the syntax (https in prod) before the send, the address by the connection."""
    await add(maker, box, receiver.url("/hook"))  # loopback allowed when added
    await emit(maker, "escalated")
    async with contextlib.aclosing(webhook_client(at_defaults(settings))) as client:
        assert await deliver(maker, client, box) == DeliveryResult(dead=1)
    assert receiver.requests == []
    assert "127.0.0.1 is a loopback address" in outbox(db)[0]["last_error"]

    db.execute("DELETE FROM outbox")
    await emit(maker, "escalated")
    async with contextlib.aclosing(webhook_client(at_defaults(settings, env="prod"))) as client:
        assert await deliver(maker, client, box) == DeliveryResult(dead=1)
    assert receiver.requests == []
    assert "must be https://" in outbox(db)[0]["last_error"]


async def test_redirects_are_never_followed(maker, webhooks, box, receiver, db) -> None:
    await add(maker, box, receiver.url("/moved"))
    receiver.answer("/moved", 302, headers={"Location": receiver.url("/elsewhere")})
    await emit(maker, "escalated")
    assert await deliver(maker, webhooks, box) == DeliveryResult(retried=1)
    assert len(receiver.to("/moved")) == 1 and receiver.to("/elsewhere") == []
    assert outbox(db)[0]["last_error"].startswith("HTTP 302")
    assert "(redirects are not followed)" in outbox(db)[0]["last_error"]


def test_cli_refuses_internal_and_plain_http_urls_in_prod(selfheal, settings) -> None:
    refused = selfheal("add", "--url", "http://169.254.169.254/latest/meta-data/")
    assert refused.returncode == 2
    assert "link-local" in refused.stderr and "SELFHEAL_WEBHOOK_ALLOW" in refused.stderr
    plain = selfheal("add", "--url", f"http://{PUBLIC}/hook", env={"SELFHEAL_ENV": "prod"})
    assert plain.returncode == 2
    assert "must be https:// (SELFHEAL_ENV=prod)" in plain.stderr


# --- retries ---------------------------------------------------------------------------------


async def test_500_is_retried_after_a_backoff_then_delivered(maker, webhooks, box, receiver, db):
    await add(maker, box, receiver.url("/flaky"))
    receiver.answer("/flaky", 500, 503)
    await emit(maker, "escalated")

    assert await deliver(maker, webhooks, box, base_backoff_s=30.0) == DeliveryResult(retried=1)
    [row] = outbox(db)
    assert row["attempts"] == 1 and row["delivered_at"] is None and row["dead_at"] is None
    assert row["last_error"] == "HTTP 500: error 500 from receiver"
    assert 0 <= row["due_in"].total_seconds() <= 30  # full jitter over [0, 30 s]
    # Not due yet: nothing is sent.
    if row["due_in"].total_seconds() > 1:
        assert await deliver(maker, webhooks, box) == DeliveryResult()

    make_due(db)
    assert await deliver(maker, webhooks, box, base_backoff_s=30.0) == DeliveryResult(retried=1)
    [row] = outbox(db)
    assert row["attempts"] == 2 and 0 <= row["due_in"].total_seconds() <= 60  # doubled ceiling

    make_due(db)
    assert await deliver(maker, webhooks, box) == DeliveryResult(delivered=1)
    [row] = outbox(db)
    assert row["attempts"] == 3 and row["delivered_at"] is not None
    # The same delivery each time, signed afresh.
    requests = receiver.to("/flaky")
    assert len(requests) == 3
    assert len({r.headers["x-selfheal-delivery"] for r in requests}) == 1
    assert len({r.body for r in requests}) == 1


async def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap(
    maker, webhooks, box, receiver, db
) -> None:
    await add(maker, box, receiver.url("/down"))
    receiver.always["/down"] = 502

    class Top(random.Random):
        """Always the top of the jitter range, to see the ceiling."""

        def uniform(self, a: float, b: float) -> float:
            return b

    await emit(maker, "escalated")
    ceilings = []
    for _ in range(6):
        await deliver(maker, webhooks, box, base_backoff_s=1.0, max_backoff_s=10.0, rng=Top())
        ceilings.append(round(outbox(db)[0]["due_in"].total_seconds()))
        make_due(db)
    assert ceilings == [1, 2, 4, 8, 10, 10]


async def test_retry_after_is_honoured(maker, webhooks, box, receiver, db) -> None:
    await add(maker, box, receiver.url("/busy"))
    receiver.answer("/busy", 429, headers={"Retry-After": "120"})
    await emit(maker, "escalated")
    assert await deliver(maker, webhooks, box, base_backoff_s=0.01) == DeliveryResult(retried=1)
    [row] = outbox(db)
    assert 115 < row["due_in"].total_seconds() <= 120 and row["last_error"].startswith("HTTP 429")


async def test_400_is_dead_at_once(maker, webhooks, box, receiver, db) -> None:
    await add(maker, box, receiver.url("/refuses"))
    await add(maker, box, receiver.url("/fine"))
    receiver.always["/refuses"] = 400
    await emit(maker, "escalated")
    assert await deliver(maker, webhooks, box) == DeliveryResult(delivered=1, dead=1)
    dead = [row for row in outbox(db) if row["dead_at"] is not None]
    assert len(dead) == 1 and dead[0]["attempts"] == 1
    assert dead[0]["last_error"] == "HTTP 400: error 400 from receiver (refused; not retried)"
    make_due(db)
    assert await deliver(maker, webhooks, box) == DeliveryResult()
    assert len(receiver.to("/refuses")) == 1


async def test_max_attempts_then_dead(maker, webhooks, box, receiver, db) -> None:
    await add(maker, box, receiver.url("/down"))
    receiver.always["/down"] = 500
    await emit(maker, "escalated")
    results = []
    for _ in range(4):
        results.append(await deliver(maker, webhooks, box, max_attempts=3))
        make_due(db)
    assert results == [
        DeliveryResult(retried=1),
        DeliveryResult(retried=1),
        DeliveryResult(dead=1),
        DeliveryResult(),
    ]
    [row] = outbox(db)
    assert row["attempts"] == 3 and row["dead_at"] is not None
    assert row["last_error"] == "HTTP 500: error 500 from receiver (gave up after 3 attempts)"
    assert len(receiver.to("/down")) == 3


async def test_timeouts_and_unreachable_receivers_are_retried(maker, webhooks, box, receiver, db):
    await add(maker, box, receiver.url("/slow"))
    await add(maker, box, f"http://127.0.0.1:{free_port()}/nobody-home")
    receiver.delay_s["/slow"] = 5
    await emit(maker, "escalated")
    started = time.monotonic()
    assert await deliver(maker, webhooks, box, request_timeout_s=0.3) == DeliveryResult(retried=2)
    assert time.monotonic() - started < 3
    errors = sorted(row["last_error"] for row in outbox(db))
    assert errors[0].startswith("ConnectError")
    assert errors[1] == "no answer within 0.3 s"


async def test_one_bad_row_does_not_stop_the_batch(maker, webhooks, box, receiver, db) -> None:
    good = await add(maker, box, receiver.url("/good"))
    bad = await add(maker, box, receiver.url("/bad"))
    await emit(maker, "escalated")
    # A secret sealed for another endpoint does not open (bound to the endpoint id).
    db.execute(
        "UPDATE notification_endpoints SET secret_enc = (SELECT secret_enc FROM"
        " notification_endpoints WHERE id = %s) WHERE id = %s",
        (good.endpoint.id, bad.endpoint.id),
    )
    assert await deliver(maker, webhooks, box) == DeliveryResult(delivered=1, dead=1)
    [dead] = [row for row in outbox(db) if row["dead_at"] is not None]
    assert dead["endpoint_id"] == bad.endpoint.id and dead["attempts"] == 0
    assert dead["last_error"].startswith("endpoint secret unreadable")
    assert len(receiver.to("/good")) == 1 and not receiver.to("/bad")


async def test_disabling_gives_up_waiting_deliveries(maker, webhooks, box, receiver, db) -> None:
    first = await add(maker, box, receiver.url("/one"))
    second = await add(maker, box, receiver.url("/two"))
    await emit(maker, "escalated")
    async with maker() as session, session.begin():
        _, dropped = await disable_endpoint(session, first.endpoint.id)
    assert dropped == 1
    # Disabled in psql between queueing and sending: given up at send time, nothing sent.
    db.execute(
        "UPDATE notification_endpoints SET disabled_at = now() WHERE id = %s", (second.endpoint.id,)
    )
    assert await deliver(maker, webhooks, box) == DeliveryResult(dead=1)
    rows = outbox(db)
    assert [(row["last_error"], row["attempts"]) for row in rows] == [
        ("endpoint disabled", 0),
        ("endpoint disabled", 0),
    ]
    assert receiver.requests == []
    assert await emit(maker, "escalated") == 0


# --- concurrency and leases ------------------------------------------------------------------


async def test_two_workers_send_each_row_once(settings, box, receiver, db) -> None:
    setup_engine = create_engine(settings, role="test")
    try:
        await add(create_sessionmaker(setup_engine), box, receiver.url("/hook"))
        for _ in range(40):
            await emit(create_sessionmaker(setup_engine), "escalated")
    finally:
        await setup_engine.dispose()
    receiver.delay_s["/hook"] = 0.02
    totals: list[int] = []

    async def worker() -> None:
        engine = create_engine(settings, role="test")
        delivered = 0
        try:
            async with contextlib.aclosing(
                webhook_client(WebhookPolicy.from_settings(settings))
            ) as client:
                while True:
                    result = await deliver_due(
                        create_sessionmaker(engine),
                        client,
                        box,
                        decision_client=None,
                        limit=5,
                        concurrency=4,
                    )
                    if result == DeliveryResult():
                        break
                    delivered += result.delivered
        finally:
            await engine.dispose()
        totals.append(delivered)

    await asyncio.gather(worker(), worker())
    ids = [request.headers["x-selfheal-delivery"] for request in receiver.requests]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert sum(totals) == 40 and min(totals) > 0, totals
    assert all(row["delivered_at"] is not None for row in outbox(db))


async def test_a_worker_killed_mid_send_leaves_the_row_to_another_after_the_lease(
    maker, webhooks, box, receiver, db
) -> None:
    await add(maker, box, receiver.url("/hook"))
    await emit(maker, "escalated")
    receiver.delay_s["/hook"] = 30
    options = {"lease_s": 2.5, "request_timeout_s": 1.0}
    killed = asyncio.create_task(deliver(maker, webhooks, box, **options))
    async with asyncio.timeout(5):
        while not receiver.requests:
            await asyncio.sleep(0.01)
    killed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await killed
    [row] = outbox(db)
    assert row["attempts"] == 0 and 0 < row["due_in"].total_seconds() <= 2.5
    # While the lease holds, nobody else sends it.
    assert await deliver(maker, webhooks, box, **options) == DeliveryResult()
    receiver.delay_s["/hook"] = 0
    await asyncio.sleep(row["due_in"].total_seconds() + 0.05)
    assert await deliver(maker, webhooks, box, **options) == DeliveryResult(delivered=1)
    assert len(receiver.requests) == 2


# --- feedback --------------------------------------------------------------------------------


def sira_feedback(server: Server, attempt_id: str) -> list[dict[str, Any]]:
    items = httpx.get(f"{server.url}/api/sira/feedback", headers=server.auth).json()["items"]
    return [item for item in items if item["attempt_id"] == attempt_id]


async def make_feedback(
    plugin: Plugin, db: Any, outcome: str = "rolled_back", incident_type: str = "error_spike"
) -> Feedback:
    incident_id = db.execute(
        "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, plugin_version,"
        " type, severity) VALUES (%s, %s, %s, '1.2.2', %s, 'high') RETURNING id",
        (plugin.id, plugin.tenant, plugin.name, incident_type),
    ).fetchone()[0]
    attempt_id = db.execute(
        "INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, action,"
        " from_version, to_version, status, decision_source, confidence)"
        " VALUES (%s, %s, 'patch', '1.2.2', '1.2.3', 'pending', 'sira', 0.87) RETURNING id",
        (incident_id, plugin.id),
    ).fetchone()[0]
    return Feedback(
        incident_id=str(incident_id),
        attempt_id=str(attempt_id),
        incident_type=incident_type,
        plugin=plugin.name,
        from_version="1.2.2",
        to_version="1.2.3",
        decision_source="sira",
        confidence=0.87,
        outcome=outcome,
    )


async def record(maker: async_sessionmaker[AsyncSession], feedback: Feedback) -> bool:
    async with maker() as session, session.begin():
        return await record_outcome(session, feedback)


@contextlib.asynccontextmanager
async def decision_client(url: str | None, **options: Any) -> AsyncIterator[DecisionClient]:
    options.setdefault("deadline_s", 1.0)
    async with httpx.AsyncClient() as client:
        yield DecisionClient(client, base_url=url, token=SIRA_TOKEN, **options)


async def test_feedback_is_recorded_once_and_delivered_to_the_decision_service(
    settings, maker, webhooks, box, sira, db
) -> None:
    plugin = await register(settings)
    feedback = await make_feedback(plugin, db)
    # The healing loop may call twice, even at the same time: one row, one delivery.
    assert sorted(await asyncio.gather(record(maker, feedback), record(maker, feedback))) == [
        False,
        True,
    ]
    assert await record(maker, feedback) is False
    stored = db.execute(
        "SELECT incident_id, attempt_id, incident_type, plugin_name, from_version, to_version,"
        " decision_source, confidence::float8, outcome FROM sira_learning_feedback"
    ).fetchall()
    assert [tuple(map(str, row)) for row in stored] == [
        (
            feedback.incident_id,
            feedback.attempt_id,
            "error_spike",
            "payments",
            "1.2.2",
            "1.2.3",
            "sira",
            "0.87",
            "rolled_back",
        )
    ]
    [row] = outbox(db)
    assert (row["kind"], row["topic"], row["payload"]) == (
        "feedback",
        "feedback",
        feedback.as_json(),
    )

    async with decision_client(sira.url) as client:
        assert await deliver(maker, webhooks, box, decision_client=client) == DeliveryResult(
            delivered=1
        )
        assert await deliver(maker, webhooks, box, decision_client=client) == DeliveryResult()
    assert sira_feedback(sira, feedback.attempt_id) == [feedback.as_json()]
    [row] = outbox(db)
    assert row["delivered_at"] is not None and row["attempts"] == 1


async def test_feedback_waits_while_no_decision_service_is_configured(
    settings, maker, webhooks, box, receiver, db
) -> None:
    plugin = await register(settings)
    await record(maker, await make_feedback(plugin, db))
    await add(maker, box, receiver.url("/hook"))
    await emit(maker, "escalated")
    [before_fb, _] = outbox(db)
    async with decision_client(None) as unconfigured:
        results = [
            await deliver(maker, webhooks, box, decision_client=client)
            for client in (None, unconfigured)
        ]
    assert results == [DeliveryResult(delivered=1), DeliveryResult()]
    feedback_row = outbox(db)[0]
    assert feedback_row["kind"] == "feedback"
    assert (feedback_row["attempts"], feedback_row["delivered_at"], feedback_row["dead_at"]) == (
        0,
        None,
        None,
    )
    assert feedback_row["next_attempt_at"] == before_fb["next_attempt_at"]  # not even claimed
    assert len(receiver.requests) == 1


async def test_feedback_to_a_down_service_stays_pending_and_is_retried(
    settings, maker, webhooks, box, db
) -> None:
    plugin = await register(settings)
    first = await make_feedback(plugin, db)
    await record(maker, first)
    second = await make_feedback(plugin, db, "success", "webhook_fail_rate")
    await record(maker, second)
    server = Server(["sim.decision_service"], SIRA_TOKEN)  # not started: down
    breaker = CircuitBreaker(failure_threshold=1, cool_down_s=0.5)
    try:
        async with decision_client(server.url, breaker=breaker) as client:
            # The first call fails and opens the circuit; the second row is put back
            # without counting an attempt.
            result = await deliver(maker, webhooks, box, decision_client=client)
            assert result == DeliveryResult(retried=1, deferred=1)
            rows = outbox(db)
            assert [row["attempts"] for row in rows] == [1, 0]
            assert rows[0]["last_error"].startswith("cannot reach the decision service")
            assert all(row["dead_at"] is None and row["delivered_at"] is None for row in rows)

            server.start()
            await asyncio.sleep(breaker.retry_in_s())
            make_due(db)
            result = await deliver(maker, webhooks, box, decision_client=client)
            assert result == DeliveryResult(delivered=2)
        assert sira_feedback(server, first.attempt_id) == [first.as_json()]
        assert sira_feedback(server, second.attempt_id) == [second.as_json()]
    finally:
        server.stop()


async def test_feedback_refused_for_good_is_dead(settings, maker, webhooks, box, sira, db) -> None:
    plugin = await register(settings)
    await record(maker, await make_feedback(plugin, db))
    # A 404 (wrong SIRA_API_URL path) is not retried: the same request meets the same refusal.
    async with decision_client(sira.url + "/wrong-prefix") as client:
        result = await deliver(maker, webhooks, box, decision_client=client)
    assert result == DeliveryResult(dead=1)
    [row] = outbox(db)
    assert row["last_error"] == "HTTP 404 from the decision service" and row["attempts"] == 1
