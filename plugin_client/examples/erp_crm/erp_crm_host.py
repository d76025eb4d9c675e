"""A FastAPI host running the erp_crm plugin with the selfheal agent embedded.

    uvicorn --factory erp_crm_host:create_app --port 8200

Everything comes from the environment: the SELFHEAL_* variables of plugin_client (URL, plugin
id, secret, public keys, state dir), ERP_CRM_PLUGIN_ROOT (where versions/ and current live,
default ./run/erp_crm) and ERP_CRM_WEBHOOK_URL (where order webhooks go; unset: none sent).

What it shows:
- the agent's counters fed by SelfhealMiddleware (requests, 5xx, exceptions, latency) and by
  `agent.webhook()` around each webhook call;
- updates and rollbacks handled by FolderUpdater, with the host's reload and health check, so
  a version that does not load or is unhealthy is switched back at once;
- the agent started and stopped with the app (lifespan)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException

from plugin_client import AsyncAgent, FolderUpdater, SelfhealMiddleware

HERE = Path(__file__).resolve().parent
PLUGIN_NAME = "erp_crm"
log = logging.getLogger("erp_crm_host")


def read_manifest(folder: Path) -> dict[str, str]:
    """The flat `key: "value"` lines of plugin.yaml (enough for name/version/entry_point)."""
    manifest: dict[str, str] = {}
    for line in (folder / "plugin.yaml").read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "#")):
            manifest[key.strip()] = value.strip().strip("\"'")
    return manifest


def install_first_version(root: Path, source: Path) -> None:
    """On a fresh machine: copy the bundled plugin in as versions/<its version>, current."""
    if (root / "current").is_symlink():
        return
    version = read_manifest(source)["version"]
    target = root / "versions" / version
    if not target.exists():
        shutil.copytree(source, target)
    (root / "current").symlink_to(f"versions/{version}")


class PluginHost:
    """Loads the plugin from `<root>/current` (what an xcore host does on reload)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.plugin: Any = None
        self.config: dict[str, Any] = {}
        self._loads = 0

    def reload(self) -> None:
        folder = self.root / "current"
        module_path, _, class_name = read_manifest(folder)["entry_point"].partition(":")
        source = folder / (module_path.replace(".", "/") + ".py")
        self._loads += 1
        spec = importlib.util.spec_from_file_location(f"erp_crm_plugin_{self._loads}", source)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {source}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        plugin = getattr(module, class_name)()
        plugin.configure(self.config)
        self.plugin = plugin
        log.info("loaded %s %s", PLUGIN_NAME, plugin.version)

    def health_check(self) -> bool:
        return self.plugin is not None and bool(self.plugin.health())

    def configure(self, values: dict[str, Any]) -> None:
        self.config.update(values)
        if self.plugin is not None:
            self.plugin.configure(values)


def create_app() -> FastAPI:
    root = Path(os.environ.get("ERP_CRM_PLUGIN_ROOT", "run/erp_crm")).resolve()
    install_first_version(root, HERE / "plugin")
    host = PluginHost(root)
    updater = FolderUpdater(root, health_check=host.health_check, reload=host.reload)
    agent = AsyncAgent(
        plugin=os.environ.get("SELFHEAL_PLUGIN_NAME", PLUGIN_NAME),
        version=updater.current_version(),
        state_dir=os.environ.get("SELFHEAL_STATE_DIR") or root / ".selfheal-state",
    )
    agent.use(updater)
    agent.on_config(host.configure)
    webhook_url = os.environ.get("ERP_CRM_WEBHOOK_URL")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host.reload()
        async with httpx.AsyncClient(timeout=5.0) as client:
            app.state.webhooks = client
            async with agent:  # starts the heartbeat task; stops it on shutdown
                yield

    app = FastAPI(title="erp_crm host", lifespan=lifespan)
    app.state.agent = agent
    app.add_middleware(SelfhealMiddleware, agent=agent, exclude_paths=("/health",))

    async def send_webhook(client: httpx.AsyncClient, url: str, event: dict[str, Any]) -> None:
        try:
            async with agent.webhook() as hook:
                response = await client.post(url, json=event)
                if response.status_code >= 400:
                    hook.failed()  # the merchant answered, with an error
        except httpx.HTTPError as exc:
            log.warning("webhook to %s failed: %s", url, exc)  # counted as a failure already

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "plugin": PLUGIN_NAME,
            "version": agent.version,
            "healthy": host.health_check(),
            "agent": dataclasses.asdict(agent.stats),
        }

    @app.post("/orders")
    async def sync_order(order: dict[str, Any]) -> dict[str, Any]:
        try:
            result: dict[str, Any] = host.plugin.handle_order(order)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if webhook_url:
            await send_webhook(app.state.webhooks, webhook_url, {"type": "order.synced", **result})
        return result

    return app
