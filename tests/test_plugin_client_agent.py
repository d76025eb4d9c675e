"""The synchronous Agent end to end against a fake control plane on loopback: good updates and
rollbacks, at-most-once across restarts, telemetry while the server is away, the backoff
schedule, acks that could not be delivered, configuration from the environment."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from plugin_client import Agent, EarlyReport, HeartbeatFailed
from tests.support.artifacts import PLUGIN, ReleaseSigner
from tests.support.fakes import FakeControlPlane, agent_options, command, running

pytestmark = pytest.mark.no_services

DATA = b"the bytes of erp_crm 1.2.3"


class Ceiling(random.Random):
    """uniform(a, b) gives b: the agent's delays are then their upper bounds, exactly."""

    def random(self) -> float:
        return 1.0


class Floor(random.Random):
    def random(self) -> float:
        return 0.0


class Schedule:
    """The agent's `wait`: records each delay it chose instead of sleeping; stops the loop
    after `count` of them."""

    def __init__(self, count: int, then: Callable[[], None] | None = None) -> None:
        self.count = count
        self.then = then
        self.delays: list[float] = []
        self.done = threading.Event()

    def __call__(self, delay: float) -> bool:
        self.delays.append(delay)
        if self.then is not None:
            self.then()
        if len(self.delays) >= self.count:
            self.done.set()
            return True
        return False

    def run(self, agent: Agent) -> list[float]:
        agent.start()
        assert self.done.wait(60), f"only {len(self.delays)} delays: {self.delays}"
        agent.stop()
        return self.delays


@pytest.fixture
def cp() -> Iterator[FakeControlPlane]:
    with running(FakeControlPlane()) as plane:
        yield plane


@pytest.fixture
def signer() -> ReleaseSigner:
    return ReleaseSigner()


@pytest.fixture
def make_agent(
    cp: FakeControlPlane, signer: ReleaseSigner, tmp_path: Path
) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(**overrides: Any) -> Agent:
        options = agent_options(cp, signer, tmp_path, **overrides)
        agent = Agent(**options)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


def update_command(
    cp: FakeControlPlane, signer: ReleaseSigner, version: str = "1.2.3", **kw: Any
) -> dict[str, Any]:
    data = DATA + version.encode()
    cp.artifacts[(PLUGIN, version)] = data
    url = f"{cp.url}/api/plugins/releases/{PLUGIN}/{version}/artifact"
    return command("update", signer.payload(data, version=version, artifact_url=url), **kw)


# --------------------------------------------------------------------------- good commands


def test_good_update_runs_once_is_acked_and_a_heartbeat_with_the_new_version_follows(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    installed: list[tuple[str, bytes]] = []
    agent.on_update(lambda version, path: installed.append((version, path.read_bytes())))
    cmd = update_command(cp, signer)
    cp.queue(cmd)
    # The server asks for the next heartbeat in an hour: only the agent's own follow-up after
    # the update can bring 1.2.3 to it.
    agent.start()
    assert cp.wait_for(lambda: any(e.body["plugin_version"] == "1.2.3" for e in cp.exchanges))
    agent.stop()
    assert installed == [("1.2.3", DATA + b"1.2.3")]
    acks = cp.reports_for(cmd["id"], "ack")
    assert [a.body for a in acks] == [
        {"result": {"version": "1.2.3", "sha256": cmd["payload"]["sha256"]}}
    ]
    versions = [e.body["plugin_version"] for e in cp.exchanges]
    assert versions == ["1.2.2", "1.2.3"]
    assert agent.version == "1.2.3"
    stats = agent.stats
    assert (stats.commands_applied, stats.heartbeats_sent, stats.heartbeats_failed) == (1, 2, 0)
    # The download was a signed plugin request to the control plane itself.
    assert cp.artifact_headers[0]["x-plugin-id"] == cp.plugin_id
    assert cp.auth_failures == []


def test_good_rollback_runs_once_is_acked_and_a_heartbeat_with_that_version_follows(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    agent.on_update(lambda version, path: None)
    rolled_back: list[str] = []
    agent.on_rollback(rolled_back.append)
    cp.queue(update_command(cp, signer))
    agent.beat()
    assert agent.version == "1.2.3"
    rollback = command("rollback", {"version": "1.2.2"})
    cp.queue(rollback)
    start = len(cp.exchanges)
    agent.start()
    assert cp.wait_for(
        lambda: (
            cp.exchanges[-1].body["plugin_version"] == "1.2.2" and len(cp.exchanges) >= start + 2
        )
    )
    agent.stop()
    assert rolled_back == ["1.2.2"]
    assert [a.body for a in cp.reports_for(rollback["id"], "ack")] == [
        {"result": {"version": "1.2.2"}}
    ]
    assert [e.body["plugin_version"] for e in cp.exchanges[start:]] == ["1.2.3", "1.2.2"]


def test_signed_rollback_to_a_held_release_runs(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    agent.on_update(lambda version, path: None)
    rolled_back: list[str] = []
    agent.on_rollback(rolled_back.append)
    first = update_command(cp, signer, "1.2.3")
    cp.queue(first, update_command(cp, signer, "1.3.0"))
    agent.beat()
    assert agent.version == "1.3.0"
    # The rollback names the signed release of 1.2.3: it must be the bytes this agent ran.
    cp.queue(command("rollback", first["payload"]))
    agent.beat()
    assert rolled_back == ["1.2.3"]
    assert agent.version == "1.2.3"


def test_config_command_reaches_its_handler(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    seen: list[dict[str, Any]] = []
    agent.on_config(seen.append)
    cmd = command("config", {"values": {"webhook_timeout_s": 5, "retries": 2}})
    cp.queue(cmd)
    agent.beat()
    assert seen == [{"webhook_timeout_s": 5, "retries": 2}]
    ack = cp.reports_for(cmd["id"], "ack")[0].body
    assert ack == {"result": {"version": "1.2.2", "config_keys": ["retries", "webhook_timeout_s"]}}


def test_failing_handler_fails_the_command_with_its_message(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()

    @agent.on_update
    def install(version: str, artifact: Path) -> None:
        raise RuntimeError("disk full while unpacking")

    cmd = update_command(cp, signer)
    cp.queue(cmd)
    agent.beat()
    assert cp.reports_for(cmd["id"], "fail")[0].body == {
        "error": "disk full while unpacking",
        "retryable": False,
    }
    assert agent.version == "1.2.2"
    assert agent.stats.commands_failed == 1


def test_artifact_on_another_origin_gets_no_signature(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    installed: list[bytes] = []
    agent.on_update(lambda version, path: installed.append(path.read_bytes()))
    with running(FakeControlPlane()) as mirror:
        mirror.mirror["erp.tgz"] = DATA
        payload = signer.payload(DATA, version="1.2.3", artifact_url=f"{mirror.url}/mirror/erp.tgz")
        cp.queue(command("update", payload))
        agent.beat()
    assert installed == [DATA]
    sent = mirror.mirror_headers[0]
    assert not {"x-signature", "x-timestamp", "x-plugin-id"} & set(sent)


# --------------------------------------------------------------------------- at most once


def test_replayed_command_never_runs_twice_and_gets_its_ack_again(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    calls: list[str] = []
    agent.on_update(lambda version, path: calls.append(version))
    cmd = update_command(cp, signer)
    cp.queue(cmd)
    agent.beat()
    cp.queue(cmd)  # the ack was "lost": the same command comes back
    agent.beat()
    agent.close()
    restarted = make_agent(version="1.2.3")
    restarted.on_update(lambda version, path: calls.append(version))
    cp.queue(cmd)  # and once more after a restart
    restarted.beat()
    assert calls == ["1.2.3"]
    acks = cp.reports_for(cmd["id"], "ack")
    assert len(acks) == 3 and all(a.body == acks[0].body for a in acks)


def test_command_interrupted_in_its_handler_is_not_run_again_after_a_restart(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    calls: list[str] = []

    @agent.on_update
    def dies(version: str, artifact: Path) -> None:
        calls.append(version)
        raise SystemExit("the process dies half way through the update")

    cmd = update_command(cp, signer)
    cp.queue(cmd)
    with pytest.raises(SystemExit):
        agent.beat()
    assert cp.reports_for(cmd["id"]) == []  # it died before it could say anything
    agent.close()

    restarted = make_agent()
    restarted.on_update(lambda version, path: calls.append(version))
    cp.queue(cmd)  # redelivered: the server never heard back
    restarted.beat()
    assert calls == ["1.2.3"]
    assert cp.fail_reason(cmd["id"]) == "interrupted while applying; state unknown"
    cp.queue(cmd)
    restarted.beat()
    assert calls == ["1.2.3"]
    assert len(cp.reports_for(cmd["id"], "fail")) == 2


def test_journal_is_written_atomically_and_bounded(
    cp: FakeControlPlane, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = make_agent()
    agent.on_config(lambda values: None)
    cmd = command("config", {"values": {}})
    cp.queue(cmd)
    agent.beat()
    journal = json.loads((tmp_path / "state" / "commands.json").read_text())
    entry = journal["commands"][cmd["id"]]
    assert entry["state"] == "done" and entry["report"]["action"] == "ack"
    versions = json.loads((tmp_path / "state" / "versions.json").read_text())
    assert list(versions["versions"]) == ["1.2.2"]
    leftovers = [p.name for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------- telemetry


def test_telemetry_survives_the_server_being_away(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    agent.record_request(10)
    agent.beat()
    assert cp.accepted()[-1]["telemetry"]["requests"] == 10

    cp.stop()  # connection refused
    agent.record_request(5)
    agent.record_error(RuntimeError("boom"))
    agent.record_webhook(ok=False)
    agent.record_latency(120.0)
    with pytest.raises(HeartbeatFailed, match="unreachable"):
        agent.beat()

    cp.start()
    cp.mode = "503"
    cp.retry_after = "5"
    agent.record_request(3)
    agent.record_webhook(ok=True, count=4)
    with pytest.raises(HeartbeatFailed) as failed:
        agent.beat()
    assert failed.value.status_code == 503 and failed.value.retry_after == 5.0

    cp.mode = "ok"
    cp.signing = "unsigned"  # a 200 nobody can vouch for does not eat telemetry either
    agent.record_request(2)
    with pytest.raises(HeartbeatFailed):
        agent.beat()

    # Each failure above sent the heartbeat of the outage again as the same signed bytes; the
    # unsigned 200 stored it, so its next copy gets the signed 401 replay: delivered, once.
    cp.signing = "signed"
    assert agent.beat() == {}
    assert cp.replays == 1
    # The counts made since go with the next heartbeat, a new one.
    agent.beat()
    assert [hb["telemetry"] for hb in cp.stored()] == [
        {"requests": 10, "errors": 0, "webhook_attempts": 0, "webhook_failures": 0},
        {
            "requests": 5,
            "errors": 1,
            "webhook_attempts": 1,
            "webhook_failures": 1,
            "latency_p95_ms": 120.0,
        },
        {"requests": 5, "errors": 0, "webhook_attempts": 4, "webhook_failures": 0},
    ]
    agent.beat()
    assert cp.stored()[-1]["telemetry"] == {
        "requests": 0,
        "errors": 0,
        "webhook_attempts": 0,
        "webhook_failures": 0,
    }
    stats = agent.stats
    assert (stats.heartbeats_failed, stats.heartbeats_resent, stats.heartbeats_sent) == (3, 3, 4)
    assert cp.rejected_bodies == []


def test_a_heartbeat_whose_answer_was_lost_is_sent_again_as_is_and_counted_once(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    """The control plane stored the heartbeat but the answer broke off: the agent sends the
    same signed bytes again (not a new heartbeat with the same counts, which would be stored
    twice), and the signed 401 replay tells it the first one arrived."""
    agent = make_agent()
    agent.record_request(7)
    cp.mode = "lost"
    with pytest.raises(HeartbeatFailed, match="unreachable"):
        agent.beat()
    agent.record_request(2)  # counted meanwhile: goes with the next new heartbeat
    cp.mode = "ok"
    assert agent.beat() == {}  # the copy: 401 replay, signed
    agent.beat()
    stored = cp.stored()
    assert [hb["telemetry"]["requests"] for hb in stored] == [7, 2]
    assert [e.body["uptime_s"] for e in cp.exchanges] == [hb["uptime_s"] for hb in stored]
    assert cp.replays == 1
    assert agent.stats.heartbeats_resent == 1


def test_an_unsigned_replay_answer_proves_nothing(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    """A 401 replay that does not verify is an ordinary refusal: the counts stay, and go with a
    new heartbeat (error answers are unsigned, so anyone on the path could forge one)."""
    agent = make_agent()
    agent.record_request(4)
    cp.mode = "lost"
    with pytest.raises(HeartbeatFailed):
        agent.beat()
    cp.mode = "ok"
    cp.signing = "unsigned"
    with pytest.raises(HeartbeatFailed, match="401"):
        agent.beat()
    cp.signing = "signed"
    agent.beat()
    assert [hb["telemetry"]["requests"] for hb in cp.stored()] == [4, 4]
    assert agent.stats.heartbeats_resent == 1


def test_a_heartbeat_refused_for_good_is_not_sent_again(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    """A 401 other than a verified replay (here: the control plane refuses the plugin) is final
    for that request: the next heartbeat is a new one, signed anew, with every count."""
    agent = make_agent()
    agent.record_request(3)
    cp.mode = "401"
    with pytest.raises(HeartbeatFailed):
        agent.beat()
    agent.record_request(1)
    cp.mode = "ok"
    agent.beat()
    assert [hb["telemetry"]["requests"] for hb in cp.stored()] == [4]
    assert agent.stats.heartbeats_resent == 0


def test_a_heartbeat_too_old_to_send_again_gives_way_to_a_new_one(
    cp: FakeControlPlane, make_agent: Callable[..., Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past RESEND_WITHIN_S the server would refuse the old timestamp: a new heartbeat carries
    the counts (if the old one was stored after all, they are counted twice: the one case
    the same bytes cannot cover)."""
    import plugin_client._core as core

    agent = make_agent()
    agent.record_request(3)
    cp.stop()
    with pytest.raises(HeartbeatFailed):
        agent.beat()
    cp.start()
    monkeypatch.setattr(core, "RESEND_WITHIN_S", 0.0)
    agent.beat()
    assert [hb["telemetry"]["requests"] for hb in cp.stored()] == [3]
    assert agent.stats.heartbeats_resent == 0


def test_counting_from_many_threads_loses_nothing(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()

    def count() -> None:
        for _ in range(1000):
            agent.record_request()
            with agent.webhook():
                pass

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for _ in range(3):
        agent.beat()  # heartbeats in the middle of the counting
    for thread in threads:
        thread.join()
    agent.beat()
    total = sum(body["telemetry"]["requests"] for body in cp.accepted())
    attempts = sum(body["telemetry"]["webhook_attempts"] for body in cp.accepted())
    assert total == attempts == 8000


def test_webhook_scope_counts_a_failure_and_reraises(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent()
    with pytest.raises(ConnectionError), agent.webhook():
        raise ConnectionError("merchant endpoint down")
    with agent.webhook() as hook:
        hook.failed()  # a 500 from the merchant, no exception
    with agent.webhook():
        pass
    telemetry = agent.pending_telemetry()
    assert (telemetry["webhook_attempts"], telemetry["webhook_failures"]) == (3, 2)


def test_uptime_callable_and_body_shape(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(uptime=lambda: 42.9, meta={"host": "shop-1"}, env="staging")
    agent.beat()
    body = cp.accepted()[-1]
    assert (
        body["uptime_s"] == 42 and body["env"] == "staging" and body["meta"] == {"host": "shop-1"}
    )
    assert set(body) == {"plugin_version", "env", "uptime_s", "sent_at", "telemetry", "meta"}
    assert body["sent_at"].endswith("+00:00")


# --------------------------------------------------------------------------- the loop


def test_backoff_doubles_up_to_60_s_while_the_server_is_down(tmp_path: Path) -> None:
    down = FakeControlPlane()  # never started: connection refused
    schedule = Schedule(9)
    agent = Agent(
        down.url,
        down.plugin_id,
        down.secret,
        plugin=PLUGIN,
        version="1.2.2",
        state_dir=tmp_path / "state",
        rng=Ceiling(),
        wait=schedule,
    )
    assert schedule.run(agent) == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    agent.close()
    assert agent.stats.heartbeats_failed == 9


def test_backoff_is_capped_by_the_servers_interval_and_honours_retry_after(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    cp.next_heartbeat_s = 10

    def server_fails() -> None:
        cp.mode = "503"  # after the first accepted heartbeat

    schedule = Schedule(7, then=server_fails)
    # 10 s +10% jitter after the accepted heartbeat, then 1, 2, 4, 8 capped at 10.
    assert schedule.run(make_agent(rng=Ceiling(), wait=schedule)) == [
        pytest.approx(11.0),
        1,
        2,
        4,
        8,
        10,
        10,
    ]

    cp.retry_after = "7"
    floor = Schedule(3)
    # Full jitter may say 0 s; the server said 7.
    assert floor.run(make_agent(rng=Floor(), wait=floor)) == [7, 7, 7]


def test_loop_follows_next_heartbeat_s_with_jitter(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    cp.next_heartbeat_s = 30
    schedule = Schedule(50)
    delays = schedule.run(make_agent(rng=random.Random(7), wait=schedule))
    assert len(delays) == 50 and len(cp.exchanges) == 50
    assert all(27 <= d <= 33 for d in delays)
    assert max(delays) - min(delays) > 1  # actually spread, not a constant


def test_stop_is_prompt_and_sends_nothing_more(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent()
    agent.start()
    assert cp.wait_for(lambda: len(cp.exchanges) == 1)
    agent.stop()  # the loop is waiting an hour: stop must not wait for that
    assert agent._thread is not None and not agent._thread.is_alive()
    agent.record_request()
    assert len(cp.exchanges) == 1


# --------------------------------------------------------------------------- outbox


def test_acks_that_could_not_be_sent_are_kept_and_sent_before_the_next_heartbeat(
    cp: FakeControlPlane, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = make_agent()
    agent.on_config(lambda values: None)
    cmd = command("config", {"values": {"x": 1}})
    cp.queue(cmd)
    cp.report_status = 503  # the ack does not get through
    agent.beat()
    outbox = json.loads((tmp_path / "state" / "outbox.json").read_text())
    assert [r["id"] for r in outbox["reports"]] == [cmd["id"]]

    agent.close()
    restarted = make_agent()  # survives a restart too
    cp.report_status = 200
    restarted.beat()
    assert len(cp.reports_for(cmd["id"], "ack")) == 2
    outbox = json.loads((tmp_path / "state" / "outbox.json").read_text())
    assert outbox["reports"] == []


@pytest.mark.parametrize("status", [404, 409])
def test_404_and_409_answers_to_an_ack_are_final(
    cp: FakeControlPlane, make_agent: Callable[..., Agent], status: int
) -> None:
    agent = make_agent(state_dir=None)
    agent.on_config(lambda values: None)
    cp.report_status = status
    cmd = command("config", {"values": {}})
    cp.queue(cmd)
    agent.beat()
    agent.beat()
    assert len(cp.reports_for(cmd["id"], "ack")) == 1


def test_shared_http_client_is_not_closed(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    with httpx.Client() as client:
        agent = make_agent(http=client)
        agent.beat()
        agent.close()
        assert not client.is_closed
        assert client.get(f"{cp.url}/mirror/missing").status_code == 404


# --------------------------------------------------------------------------- configuration


_ENV = (
    "SELFHEAL_URL",
    "SELFHEAL_PLUGIN_ID",
    "SELFHEAL_PLUGIN_SECRET",
    "SELFHEAL_PLUGIN_NAME",
    "SELFHEAL_PLUGIN_VERSION",
    "SELFHEAL_PUBLIC_KEYS",
    "SELFHEAL_STATE_DIR",
)


def test_settings_come_from_the_environment(
    cp: FakeControlPlane, signer: ReleaseSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = ReleaseSigner()
    monkeypatch.setenv("SELFHEAL_URL", cp.url)
    monkeypatch.setenv("SELFHEAL_PLUGIN_ID", cp.plugin_id)
    monkeypatch.setenv("SELFHEAL_PLUGIN_SECRET", cp.secret)
    monkeypatch.setenv("SELFHEAL_PLUGIN_NAME", PLUGIN)
    monkeypatch.setenv("SELFHEAL_PLUGIN_VERSION", "1.2.2")
    monkeypatch.setenv("SELFHEAL_PUBLIC_KEYS", f"{other.public_b64}, {signer.public_b64}")
    monkeypatch.setenv("SELFHEAL_STATE_DIR", str(tmp_path / "from-env"))
    agent = Agent()
    installed: list[str] = []
    agent.on_update(lambda version, path: installed.append(version))
    cp.queue(update_command(cp, signer))  # verifies with the second pinned key
    agent.beat()
    agent.close()
    assert installed == ["1.2.3"]
    assert agent.state_dir == tmp_path / "from-env"
    assert (tmp_path / "from-env" / "commands.json").exists()


@pytest.mark.parametrize(
    ("argument", "variable"),
    [
        ("base_url", "SELFHEAL_URL"),
        ("plugin_id", "SELFHEAL_PLUGIN_ID"),
        ("secret", "SELFHEAL_PLUGIN_SECRET"),
        ("plugin", "SELFHEAL_PLUGIN_NAME"),
        ("version", "SELFHEAL_PLUGIN_VERSION"),
    ],
)
def test_missing_setting_names_the_argument_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, argument: str, variable: str
) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    given: dict[str, Any] = {
        "base_url": "http://127.0.0.1:1",
        "plugin_id": "id",
        "secret": "s",
        "plugin": PLUGIN,
        "version": "1.0.0",
    }
    del given[argument]
    with pytest.raises(ValueError, match=rf"{argument}=.*{variable}"):
        Agent(**given)


def test_bad_settings_are_refused() -> None:
    ok: dict[str, Any] = {"plugin_id": "id", "secret": "s", "plugin": PLUGIN, "version": "1.0.0"}
    with pytest.raises(ValueError, match="not an http"):
        Agent("ftp://control", **ok)
    with pytest.raises(ValueError, match="public key #1"):
        Agent("http://x", **ok, public_keys=["not base64!"])
    with pytest.raises(ValueError, match="version"):
        Agent("http://x", **{**ok, "version": "latest"})


# --------------------------------------------------------------------------- early report


def test_trouble_is_reported_at_once_not_at_the_next_scheduled_heartbeat(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    """The server asked for an hour; failing webhooks are reported as soon as the spacing
    allows, once per heartbeat, and healthy traffic waits for the schedule."""
    agent = make_agent(early_report=EarlyReport(min_spacing_s=0.2))
    agent.start()
    assert cp.wait_for(lambda: len(cp.exchanges) == 1)
    agent.record_request(count=100)
    agent.record_webhook(ok=True, count=50)  # healthy: nothing to report early
    agent.record_error(count=2)
    agent.record_webhook(ok=False, count=6)  # 6 of 56 failed: still fine
    assert not cp.wait_for(lambda: len(cp.exchanges) > 1, timeout=1.0)
    agent.record_webhook(ok=False, count=60)  # now 66 of 116 failed
    assert cp.wait_for(lambda: len(cp.exchanges) == 2)
    assert cp.exchanges[1].body["telemetry"] == {
        "requests": 100,
        "errors": 2,
        "webhook_attempts": 116,
        "webhook_failures": 66,
    }
    # Re-armed by the accepted heartbeat: errors over 5% of requests report again.
    agent.record_request(count=40)
    agent.record_error(count=10)
    assert cp.wait_for(lambda: len(cp.exchanges) == 3)
    agent.stop()
    assert cp.exchanges[2].body["telemetry"]["errors"] == 10


def test_early_report_can_be_turned_off(
    cp: FakeControlPlane, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(early_report=False)
    agent.start()
    assert cp.wait_for(lambda: len(cp.exchanges) == 1)
    agent.record_webhook(ok=False, count=100)
    assert not cp.wait_for(lambda: len(cp.exchanges) > 1, timeout=1.0)
    agent.stop()
