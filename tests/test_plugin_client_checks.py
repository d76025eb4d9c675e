"""Every check a command passes before a handler runs (docs/contracts.md, "Plugin client"): for each
tampered command, no handler is called and the control plane gets a `fail` for that command
id with a reason naming the problem."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from plugin_client import Agent, HeartbeatFailed
from tests.support.artifacts import PLUGIN, ReleaseSigner, canonical
from tests.support.fakes import FakeControlPlane, agent_options, command, running

pytestmark = pytest.mark.no_services

DATA = b"the bytes of erp_crm 1.2.3"


@dataclass
class Calls:
    update: list[tuple[str, bytes]] = field(default_factory=list)
    rollback: list[str] = field(default_factory=list)
    config: list[dict[str, Any]] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.update or self.rollback or self.config)


@pytest.fixture
def cp() -> Iterator[FakeControlPlane]:
    with running(FakeControlPlane()) as plane:
        yield plane


@pytest.fixture
def signer() -> ReleaseSigner:
    return ReleaseSigner()


MakeAgent = Callable[..., tuple[Agent, Calls]]


@pytest.fixture
def make_agent(cp: FakeControlPlane, signer: ReleaseSigner, tmp_path: Path) -> Iterator[MakeAgent]:
    agents: list[Agent] = []

    def make(*, handlers: tuple[str, ...] = ("update", "rollback", "config"), **overrides: Any):
        calls = Calls()
        options = agent_options(cp, signer, tmp_path, **overrides)
        agent = Agent(**options)
        if "update" in handlers:
            agent.on_update(lambda version, path: calls.update.append((version, path.read_bytes())))
        if "rollback" in handlers:
            agent.on_rollback(calls.rollback.append)
        if "config" in handlers:
            agent.on_config(calls.config.append)
        agents.append(agent)
        return agent, calls

    yield make
    for agent in agents:
        agent.close()


def artifact_url(cp: FakeControlPlane, version: str = "1.2.3") -> str:
    return f"{cp.url}/api/plugins/releases/{PLUGIN}/{version}/artifact"


def good_update(cp: FakeControlPlane, signer: ReleaseSigner, **kw: Any) -> dict[str, Any]:
    version = kw.pop("version", "1.2.3")
    cp.artifacts[(PLUGIN, version)] = DATA
    return signer.payload(DATA, version=version, artifact_url=artifact_url(cp, version), **kw)


def resigned(signer: ReleaseSigner, payload: dict[str, Any], statement: str) -> dict[str, Any]:
    return {**payload, "signed": statement, "signature": signer.sign(statement)}


def refused_with(
    cp: FakeControlPlane, agent: Agent, calls: Calls, cmd: dict[str, Any], expected: str
) -> str:
    cp.queue(cmd)
    agent.beat()
    assert not calls.any, "a handler was called for a refused command"
    reason = cp.fail_reason(cmd["id"])
    assert expected in reason, reason
    assert cp.reports_for(cmd["id"], "ack") == []
    assert cp.reports_for(cmd["id"], "fail")[0].body["retryable"] is False
    stats = agent.stats
    assert stats.commands_refused == 1 and stats.commands_applied == 0
    assert stats.last_refusal_reason == reason
    assert cp.auth_failures == []
    return reason


# --------------------------------------------------------------------------- updates


def _bad_signature(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return good_update(cp, ReleaseSigner())  # signed by a key nobody pinned


def _garbage_signature(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return {**good_update(cp, signer), "signature": "bm90IGEgc2lnbmF0dXJl"}


def _not_canonical(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    payload = good_update(cp, signer)
    spaced = json.dumps(json.loads(payload["signed"]), sort_keys=True)  # ", " and ": "
    return resigned(signer, payload, spaced)


def _unreadable(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return resigned(signer, good_update(cp, signer), "version 1.2.3 of erp_crm, trust me")


def _missing_key(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    payload = good_update(cp, signer)
    statement = json.loads(payload["signed"])
    del statement["expires_at"]
    return resigned(signer, payload, canonical(statement))


def _payload_sha_differs(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return {**good_update(cp, signer), "sha256": hashlib.sha256(b"other bytes").hexdigest()}


def _expired(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return good_update(cp, signer, expires_at="2020-01-01T00:00:00Z")


def _other_plugin(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return good_update(cp, signer, plugin="payments")


def _version_differs(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return {**good_update(cp, signer), "version": "1.2.4"}


def _lower(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return good_update(cp, signer, version="1.2.1")


def _same(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return good_update(cp, signer, version="1.2.2")


def _lower_by_numbers(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return good_update(cp, signer, version="1.2.2-rc1")  # a pre-release ranks below 1.2.2


def _file_url(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return {**good_update(cp, signer), "artifact_url": "file:///etc/passwd"}


def _ftp_url(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return {**good_update(cp, signer), "artifact_url": "ftp://mirror.example/erp.tgz"}


def _missing_field(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    payload = good_update(cp, signer)
    del payload["sha256"]
    return payload


def _bad_version_field(cp: FakeControlPlane, signer: ReleaseSigner) -> dict[str, Any]:
    return {**good_update(cp, signer), "version": "../../etc"}


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_bad_signature, "no pinned public key verifies"),
        (_garbage_signature, "release signature must be 64 bytes"),
        (_not_canonical, "not canonical"),
        (_unreadable, "signed statement is unreadable"),
        (_missing_key, "signed statement is unreadable"),
        (_payload_sha_differs, "payload sha256 is not the signed sha256"),
        (_expired, "release statement expired"),
        (_other_plugin, "another plugin"),
        (_version_differs, "is not the signed version"),
        (_lower, "not newer than the current version 1.2.2"),
        (_same, "not newer than the current version 1.2.2"),
        (_lower_by_numbers, "not newer than the current version 1.2.2"),
        (_file_url, "artifact URL is not http(s)"),
        (_ftp_url, "artifact URL is not http(s)"),
        (_missing_field, "malformed payload: field 'sha256'"),
        (_bad_version_field, "malformed payload: version"),
    ],
    ids=lambda value: getattr(value, "__name__", "")[1:] if callable(value) else "",
)
def test_tampered_update_is_refused_before_any_download(
    cp: FakeControlPlane,
    signer: ReleaseSigner,
    make_agent: MakeAgent,
    build: Callable[[FakeControlPlane, ReleaseSigner], dict[str, Any]],
    expected: str,
) -> None:
    agent, calls = make_agent()
    refused_with(cp, agent, calls, command("update", build(cp, signer)), expected)
    assert cp.artifact_headers == []  # nothing was fetched for a command that did not verify
    assert agent.version == "1.2.2"


def test_artifact_with_other_bytes_is_refused_after_download(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: MakeAgent, tmp_path: Path
) -> None:
    agent, calls = make_agent()
    payload = good_update(cp, signer)
    cp.artifacts[(PLUGIN, "1.2.3")] = DATA + b" and a backdoor"
    reason = refused_with(cp, agent, calls, command("update", payload), "artifact sha256 mismatch")
    assert payload["sha256"] in reason
    assert len(cp.artifact_headers) == 1
    assert list((tmp_path / "state" / "downloads").iterdir()) == []  # the bad bytes are gone


def test_artifact_larger_than_the_cap_is_refused(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: MakeAgent
) -> None:
    agent, calls = make_agent(max_artifact_bytes=10)
    refused_with(cp, agent, calls, command("update", good_update(cp, signer)), "larger than")


def test_update_without_pinned_key_is_refused(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: MakeAgent
) -> None:
    agent, calls = make_agent(public_keys=[])
    refused_with(cp, agent, calls, command("update", good_update(cp, signer)), "no public key")


# --------------------------------------------------------------------------- commands


def test_command_past_its_expiry_is_refused(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: MakeAgent
) -> None:
    agent, calls = make_agent()
    cmd = command("update", good_update(cp, signer), expires_in_s=-60)
    refused_with(cp, agent, calls, cmd, "command expired")


def test_unknown_command_type_is_refused(cp: FakeControlPlane, make_agent: MakeAgent) -> None:
    agent, calls = make_agent()
    refused_with(cp, agent, calls, command("reboot", {}), "unknown command type 'reboot'")


@pytest.mark.parametrize(
    ("command_type", "payload"),
    [
        ("config", {"values": ["not", "a", "dict"]}),
        ("config", "values"),
        ("update", None),
        ("rollback", {"version": 122}),
    ],
)
def test_malformed_payload_is_refused(
    cp: FakeControlPlane, make_agent: MakeAgent, command_type: str, payload: Any
) -> None:
    agent, calls = make_agent()
    refused_with(cp, agent, calls, command(command_type, payload), "malformed payload")


def test_command_without_a_handler_is_refused(cp: FakeControlPlane, make_agent: MakeAgent) -> None:
    agent, calls = make_agent(handlers=("update", "rollback"))
    cmd = command("config", {"values": {"timeout_s": 5}})
    refused_with(cp, agent, calls, cmd, "no on_config handler")


# --------------------------------------------------------------------------- rollbacks


def test_rollback_to_a_version_never_run_is_refused(
    cp: FakeControlPlane, make_agent: MakeAgent
) -> None:
    agent, calls = make_agent()
    cmd = command("rollback", {"version": "1.1.0"})
    refused_with(cp, agent, calls, cmd, "rollback to version 1.1.0, which this plugin never ran")


def test_rollback_to_the_current_version_is_refused(
    cp: FakeControlPlane, make_agent: MakeAgent
) -> None:
    agent, calls = make_agent()
    refused_with(cp, agent, calls, command("rollback", {"version": "1.2.2"}), "current version")


def test_rollback_to_a_version_no_longer_held_is_refused(
    cp: FakeControlPlane, make_agent: MakeAgent
) -> None:
    earlier, _ = make_agent(version="1.1.0")  # this installation ran 1.1.0 once
    earlier.close()
    agent, calls = make_agent()
    asked: list[tuple[str, str | None]] = []

    @agent.holds_version
    def holds(version: str, sha256: str | None) -> bool:
        asked.append((version, sha256))
        return False

    cmd = command("rollback", {"version": "1.1.0"})
    refused_with(cp, agent, calls, cmd, "no longer holds")
    assert asked == [("1.1.0", None)]


def test_rollback_with_a_bad_release_signature_is_refused(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: MakeAgent
) -> None:
    earlier, _ = make_agent(version="1.1.0")
    earlier.close()
    agent, calls = make_agent()
    payload = good_update(cp, ReleaseSigner(), version="1.1.0")
    refused_with(cp, agent, calls, command("rollback", payload), "no pinned public key verifies")


def test_rollback_with_an_expired_release_is_refused(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: MakeAgent
) -> None:
    earlier, _ = make_agent(version="1.1.0")
    earlier.close()
    agent, calls = make_agent()
    payload = good_update(cp, signer, version="1.1.0", expires_at="2021-06-01T00:00:00Z")
    refused_with(cp, agent, calls, command("rollback", payload), "release statement expired")


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize(
    ("signing", "expected"),
    [
        ("unsigned", "unsigned response"),
        ("bad", "response signature does not verify (HMAC mismatch)"),
        ("stale", "response signature does not verify: its timestamp is more than 300 s"),
    ],
)
def test_commands_from_a_response_that_does_not_verify_are_refused(
    cp: FakeControlPlane,
    signer: ReleaseSigner,
    make_agent: MakeAgent,
    signing: str,
    expected: str,
) -> None:
    agent, calls = make_agent()
    cp.signing = signing
    good = command("update", good_update(cp, signer))
    config = command("config", {"values": {"a": 1}})
    cp.queue(good, config)
    with pytest.raises(HeartbeatFailed, match="response"):
        agent.beat()
    assert not calls.any
    assert cp.artifact_headers == []
    for cmd in (good, config):
        assert expected in cp.fail_reason(cmd["id"])
    assert agent.stats.heartbeats_failed == 1 and agent.stats.heartbeats_sent == 0
    assert agent.version == "1.2.2"
