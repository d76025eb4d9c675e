"""selfheal plugin client: what a plugin embeds to talk to the selfheal control plane.

    from plugin_client import Agent
    agent = Agent(plugin="erp_crm", version="1.2.2")   # the rest from SELFHEAL_* variables
    agent.record_request(); agent.record_error(exc); agent.record_webhook(ok=True)
    agent.use(FolderUpdater("/srv/plugins/erp_crm", health_check=check))
    agent.start(); ...; agent.stop()

See docs/plugin_client.md. Dependencies: httpx and cryptography."""

from plugin_client._base import WebhookScope
from plugin_client._core import AgentStats, Updater
from plugin_client.agent import Agent
from plugin_client.archive import UnsafeArchive
from plugin_client.async_agent import AsyncAgent
from plugin_client.errors import CommandRefused, HeartbeatFailed, UpdateFailed
from plugin_client.middleware import SelfhealMiddleware
from plugin_client.signing import sign_request, sign_response
from plugin_client.telemetry import EarlyReport
from plugin_client.updater import FolderUpdater
from plugin_client.versions import compare_versions

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentStats",
    "AsyncAgent",
    "CommandRefused",
    "EarlyReport",
    "FolderUpdater",
    "HeartbeatFailed",
    "SelfhealMiddleware",
    "UnsafeArchive",
    "UpdateFailed",
    "Updater",
    "WebhookScope",
    "__version__",
    "compare_versions",
    "sign_request",
    "sign_response",
]
