"""The erp_crm plugin (xcore layout: plugin.yaml + src/main.py, entry point `src.main:Plugin`).

It syncs orders to a CRM. The host loads it from `<root>/current`, which FolderUpdater moves
between versions; `health()` is what the host's health check asks after each switch."""

from __future__ import annotations

from typing import Any

VERSION = "1.2.2"
HEALTHY = True  # build_release.py --broken flips this to show a rollback on a failed check


class Plugin:
    name = "erp_crm"
    version = VERSION

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.orders_synced = 0

    def health(self) -> bool:
        return HEALTHY

    def configure(self, values: dict[str, Any]) -> None:
        self.config.update(values)

    def handle_order(self, order: dict[str, Any]) -> dict[str, Any]:
        if "id" not in order:
            raise ValueError("an order needs an id")
        self.orders_synced += 1
        return {"order_id": order["id"], "status": "synced", "plugin_version": self.version}
