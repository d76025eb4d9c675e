"""End to end as a user meets it: every control-plane setting at its default (heartbeat
interval 120 s, health window 90 s, 3 recovery heartbeats, ...), the API and a worker as
real `selfheal` processes, the reference decision service and staging runner as processes,
and plugins that embed the real plugin_client over HTTP.

- The brief's "webhook failure rate high" story: a plugin on 1.2.2 fails 60% of its webhooks;
  the update to 1.2.3 (a signed release the control plane serves) fixes it; the incident is
  resolved; tenant and ops hear of it through signed webhooks; the decision service gets the
  outcome as feedback.
- A bad deploy: 1.2.2 is known good (healthy for a whole window), its operator deploys 1.3.0
  (sick); the decision service patches forward to 1.3.1, which does not fix it; the plugin
  is rolled back to 1.2.2 (no signed release of 1.2.2 exists) and ends healthy.
- Telemetry counted while the API is down reaches the database once it is back.

Nothing here shortens a control-plane timing. The tests wait on database states with
generous deadlines; at default settings a heal takes well under a minute once the plugin
reports, and the known-good version needs one heartbeat after the 90 s window (the second
heartbeat of a plugin at the default 120 s interval)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.core.settings import Settings
from tests.support.control_plane import (
    SELFHEAL,
    ControlPlane,
    SimulatedPlugin,
    at_defaults,
    control_plane_processes,
    plugins_running,
)
from tests.support.fakes import Receiver
from tests.support.healing import add_release
from tests.support.plugins import Plugin, register
from tests.support.settings import REPO

pytestmark = pytest.mark.timeout(420)


@pytest.fixture
def defaults(settings: Settings, tmp_path: Path) -> Settings:
    return at_defaults(settings, tmp_path)


@pytest.fixture
def control_plane(defaults: Settings) -> Iterator[ControlPlane]:
    with control_plane_processes(defaults) as plane:
        yield plane


def allow_autopatch(db: Any, *tenants: str) -> None:
    """What an operator would set: autopatch on for these tenants; high severity still patched
    automatically (a regression is one level up), approvals only for critical ones."""
    db.execute(
        "UPDATE ops_policy SET autopatch_enabled = true, autopatch_whitelist = %s::jsonb,"
        " autopatch_max_severity = 'high', approval_min_severity = 'critical' WHERE id = 1",
        (orjson.dumps(list(tenants)).decode(),),
    )


async def wait_for(db: Any, what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, (
            f"{what} did not happen within {timeout_s:g} s; "
            + repr(
                db.execute(
                    "SELECT type, status, status_reason FROM plugin_incidents ORDER BY detected_at"
                ).fetchall()
            )
        )
        await asyncio.sleep(0.25)


def incident_statuses(db: Any, plugin: Plugin) -> list[tuple[str, str]]:
    return [
        (row[0], row[1])
        for row in db.execute(
            "SELECT type, status FROM plugin_incidents WHERE installation_id = %s"
            " ORDER BY detected_at",
            (plugin.id,),
        ).fetchall()
    ]


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.long_e2e
async def test_at_default_settings_a_fixing_update_heals_and_a_bad_deploy_is_rolled_back(
    defaults, control_plane, db, tmp_path
):
    plane = control_plane
    sick_webhooks = await register(defaults, tenant="merchant-42", name="erp_crm")
    deployer = await register(defaults, tenant="merchant-7", name="payments")
    # 1.2.2 and 1.3.0 are never released through selfheal.
    await add_release(defaults, tmp_path, "erp_crm", "1.2.3")
    await add_release(defaults, tmp_path, "payments", "1.3.1")
    allow_autopatch(db, "merchant-42", "merchant-7")
    plane.sira.control(regression_strategy="forward")
    receiver = Receiver()
    await receiver.start()
    for tenant in ("merchant-42", None):
        add = subprocess.run(
            [*SELFHEAL, "notify", "add", "--url", receiver.url(f"/{tenant or 'ops'}"), "--json"]
            + (["--tenant", tenant] if tenant else []),
            env=plane.env,
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
        assert add.returncode == 0, add.stderr.decode()
    # The truth: erp_crm 1.2.2 fails 60% of its webhooks (fixed in 1.2.3); payments 1.2.2 is
    # fine, and 1.3.0 and 1.3.1 fail 60% of them (fixed in neither).
    first = SimulatedPlugin(
        plane.agent(sick_webhooks, "1.2.2", tmp_path / "state-1"),
        lambda version: 0.6 if version == "1.2.2" else 0.0,
    )
    second = SimulatedPlugin(
        plane.agent(deployer, "1.2.2", tmp_path / "state-2"),
        lambda version: 0.6 if version in ("1.3.0", "1.3.1") else 0.0,
    )
    try:
        async with plugins_running(first):
            async with plugins_running(second):
                # The brief's story, on the first plugin.
                await wait_for(
                    db,
                    "the webhook incident to be resolved",
                    lambda: (
                        incident_statuses(db, sick_webhooks) == [("webhook_fail_rate", "resolved")]
                    ),
                    180,
                )
                assert first.applied == [("update", "1.2.3")]
                assert first.agent.version == "1.2.3"
                # Meanwhile the second plugin proves 1.2.2 for a whole window (its second
                # heartbeat at the default interval).
                await wait_for(
                    db,
                    "1.2.2 to become known good",
                    lambda: (
                        db.execute(
                            "SELECT known_good_version FROM merchant_plugins WHERE id = %s",
                            (deployer.id,),
                        ).fetchone()
                        == ("1.2.2",)
                    ),
                    240,
                )
            # Its operator deploys 1.3.0: the plugin restarts on the new version, same state.
            redeployed = SimulatedPlugin(
                plane.agent(deployer, "1.3.0", tmp_path / "state-2"), second.webhook_fail_share
            )
            async with plugins_running(redeployed):
                await wait_for(
                    db,
                    "the bad deploy to be rolled back",
                    lambda: incident_statuses(db, deployer) == [("regression", "rolled_back")],
                    240,
                )
            assert redeployed.applied == [("update", "1.3.1"), ("rollback", "1.2.2")]
        # It ended healthy: the rollback counted once 1.2.2 was proven healthy again.
        rolled_back_at, acked_at = db.execute(
            "SELECT i.resolved_at, c.acked_at FROM plugin_incidents i"
            " JOIN plugin_agent_commands c ON c.installation_id = i.installation_id"
            " AND c.type = 'rollback' WHERE i.installation_id = %s",
            (deployer.id,),
        ).fetchone()
        newest = db.execute(
            "SELECT plugin_version, webhook_failures FROM plugin_heartbeats"
            " WHERE installation_id = %s AND received_at > %s AND received_at <= %s"
            " ORDER BY received_at DESC LIMIT 3",
            (deployer.id, acked_at, rolled_back_at),
        ).fetchall()
        assert newest == [("1.2.2", 0)] * 3
        assert incident_statuses(db, deployer) == [("regression", "rolled_back")]
        assert db.execute(
            "SELECT plugin_version, known_good_version FROM merchant_plugins WHERE id = %s",
            (deployer.id,),
        ).fetchone() == ("1.2.2", "1.2.2")
        regression = db.execute(
            "SELECT telemetry_snapshot->'evidence'->>'previous_version', status_reason"
            " FROM plugin_incidents WHERE installation_id = %s",
            (deployer.id,),
        ).fetchone()
        assert regression[0] == "1.2.2"
        assert regression[1].startswith("rolled back to 1.2.2")
        assert db.execute(
            "SELECT payload FROM plugin_agent_commands WHERE installation_id = %s"
            " AND type = 'rollback'",
            (deployer.id,),
        ).fetchone() == ({"version": "1.2.2"},)
        attempts = db.execute(
            "SELECT a.installation_id = %s, a.action, a.from_version, a.to_version, a.status"
            " FROM plugin_autopatch_attempts a ORDER BY a.created_at",
            (sick_webhooks.id,),
        ).fetchall()
        assert attempts == [
            (True, "patch", "1.2.2", "1.2.3", "success"),
            (False, "patch", "1.3.0", "1.3.1", "rolled_back"),
        ]
        # Every command was accepted by the clients: nothing refused, nothing failed.
        for agent in (first.agent, second.agent, redeployed.agent):
            assert agent.stats.commands_refused == 0, agent.stats
        # The brief's story ends with notifications and feedback.
        await wait_for(
            db,
            "the notifications",
            lambda: (
                {"incident_opened", "patch_succeeded"}
                <= {r.json["event"] for r in receiver.to("/merchant-42")}
            ),
            60,
        )
        await wait_for(
            db,
            "the notifications to ops",
            lambda: (
                {"incident_opened", "patch_succeeded", "rolled_back"}
                <= {r.json["event"] for r in receiver.to("/ops")}
            ),
            60,
        )
        for received in receiver.requests:
            assert received.headers.get("x-selfheal-signature")
        feedback = httpx.get(
            f"{plane.sira.url}/api/sira/feedback", headers=plane.sira.auth, timeout=5
        ).json()["items"]
        outcomes = sorted((item["to_version"], item["outcome"]) for item in feedback)
        assert outcomes == [("1.2.3", "success"), ("1.3.1", "rolled_back")]
    finally:
        await receiver.stop()


async def test_telemetry_counted_while_the_api_is_down_arrives_once_it_is_back(
    defaults, control_plane, db, tmp_path
):
    plane = control_plane
    plugin = await register(defaults, tenant="merchant-5", name="erp_crm")
    agent = plane.agent(plugin, "1.2.2", tmp_path / "state")
    try:
        agent.record_request(count=100)
        await agent.beat()
        plane.stop("api")
        agent.record_request(count=250)
        agent.record_error(count=3)
        agent.record_webhook(ok=False, count=2)
        with pytest.raises(Exception):  # noqa: B017 - connection refused, as the plugin sees it
            await agent.beat()
        agent.record_request(count=50)
        plane.start_api()
        # The heartbeat that got no answer goes again as it was (it might have been stored);
        # what was counted since goes with the next one.
        await agent.beat()
        await agent.beat()
    finally:
        await agent.aclose()
    rows = db.execute(
        "SELECT requests, errors, webhook_attempts, webhook_failures FROM plugin_heartbeats"
        " WHERE installation_id = %s ORDER BY id",
        (plugin.id,),
    ).fetchall()
    assert rows == [(100, 0, 0, 0), (250, 3, 2, 2), (50, 0, 0, 0)]


def test_signed_response_helpers_agree(defaults):
    """The client's response check and the server's response signature are one format."""
    from app.plugins.signatures import response_signature
    from plugin_client import sign_response

    body = b'{"commands":[]}'
    headers = response_signature(b"s3cret", 200, "/api/plugins/heartbeat", body, timestamp=1700)
    assert headers == sign_response("s3cret", 200, "/api/plugins/heartbeat", body, timestamp=1700)
    expected = hmac.new(b"s3cret", b"1700.200./api/plugins/heartbeat." + body, hashlib.sha256)
    assert headers["X-Signature"] == "v1=" + expected.hexdigest()
