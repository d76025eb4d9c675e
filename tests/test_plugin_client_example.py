"""The example host (plugin_client/examples/erp_crm) against the fake control plane: it
starts its agent with the app, counts its traffic, installs a signed release through
FolderUpdater and refuses to stay on a release whose health check fails."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.support.artifacts import PLUGIN, ReleaseSigner
from tests.support.fakes import FakeControlPlane, command, running

pytestmark = pytest.mark.no_services

EXAMPLE = Path(__file__).resolve().parent.parent / "plugin_client" / "examples" / "erp_crm"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cp() -> Iterator[FakeControlPlane]:
    with running(FakeControlPlane()) as plane:
        yield plane


async def test_example_host_updates_and_refuses_an_unhealthy_release(
    cp: FakeControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = ReleaseSigner()
    host = load("erp_crm_host")
    build_release = load("build_release")
    monkeypatch.setenv("SELFHEAL_URL", cp.url)
    monkeypatch.setenv("SELFHEAL_PLUGIN_ID", cp.plugin_id)
    monkeypatch.setenv("SELFHEAL_PLUGIN_SECRET", cp.secret)
    monkeypatch.setenv("SELFHEAL_PUBLIC_KEYS", signer.public_b64)
    monkeypatch.setenv("SELFHEAL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ERP_CRM_PLUGIN_ROOT", str(tmp_path / "root"))
    monkeypatch.delenv("SELFHEAL_PLUGIN_NAME", raising=False)
    monkeypatch.delenv("ERP_CRM_WEBHOOK_URL", raising=False)

    def release(version: str, *, broken: bool = False) -> dict[str, Any]:
        artifact = build_release.build(version, broken=broken, out=tmp_path)
        data = artifact.read_bytes()
        cp.artifacts[(PLUGIN, version)] = data
        url = f"{cp.url}/api/plugins/releases/{PLUGIN}/{version}/artifact"
        return command("update", signer.payload(data, version=version, artifact_url=url))

    app = host.create_app()
    agent = app.state.agent
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://host") as client,
    ):
        assert await asyncio.to_thread(cp.wait_for, lambda: len(cp.exchanges) == 1)
        order = await client.post("/orders", json={"id": 7})
        assert order.json() == {"order_id": 7, "status": "synced", "plugin_version": "1.2.2"}
        assert (await client.post("/orders", json={})).status_code == 422
        assert agent.pending_telemetry()["requests"] == 2

        good = release("1.2.3")
        cp.queue(good)
        await agent.beat()
        assert cp.reports_for(good["id"], "ack")
        order = await client.post("/orders", json={"id": 8})
        assert order.json()["plugin_version"] == "1.2.3"

        broken = release("1.2.4", broken=True)
        cp.queue(broken)
        await agent.beat()
        assert "health check failed" in cp.fail_reason(broken["id"])
        health = (await client.get("/health")).json()
        assert (health["version"], health["healthy"]) == ("1.2.3", True)
        order = await client.post("/orders", json={"id": 9})
        assert order.json()["plugin_version"] == "1.2.3"
    assert (tmp_path / "root" / "current").readlink() == Path("versions/1.2.3")
    assert cp.auth_failures == [] and cp.rejected_bodies == []
