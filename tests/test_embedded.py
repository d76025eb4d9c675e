"""The embedded PostgreSQL and Redis: real servers, data kept across restarts, no leftovers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
import redis

from app.embedded import EmbeddedServices
from app.embedded.postgres import PG_APP_USER, PG_SUPERUSER
from app.embedded.supervise import pid_alive

REPO = Path(__file__).resolve().parents[1]


def _port(url: str | None) -> int:
    assert url is not None
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait_gone(pids: list[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


def _redis(url: str | None) -> redis.Redis:
    assert url is not None
    return redis.Redis.from_url(url, decode_responses=True)


def test_data_survives_restart(tmp_path: Path) -> None:
    services = EmbeddedServices(tmp_path)
    with services:
        assert services.database_owner_url is not None
        with psycopg.connect(services.database_owner_url, autocommit=True) as conn:
            conn.execute("create table kept (id int primary key, note text)")
            conn.execute("insert into kept values (1, 'hello')")
        with _redis(services.redis_url) as client:
            client.set("kept", "world")
        pids = list(services.pids.values())
        ports = [_port(services.database_url), _port(services.redis_url)]
        assert len(pids) == 2

    assert services.database_url is None and services.redis_url is None
    _wait_gone(pids)
    assert all(_port_closed(port) for port in ports)
    services.stop()  # idempotent

    with EmbeddedServices(tmp_path) as again:
        # The chosen ports are persisted and reused when free.
        assert [_port(again.database_url), _port(again.redis_url)] == ports
        assert again.database_owner_url is not None
        with psycopg.connect(again.database_owner_url) as conn:
            assert conn.execute("select note from kept where id = 1").fetchone() == ("hello",)
            (max_connections,) = conn.execute("show max_connections").fetchone() or ("",)
            assert max_connections == "200"
        with _redis(again.redis_url) as client:
            assert client.get("kept") == "world"


def test_every_login_needs_its_password(tmp_path: Path) -> None:
    with EmbeddedServices(tmp_path) as services:
        assert services.database_url and services.database_owner_url
        port = _port(services.database_url)
        for user in (PG_SUPERUSER, PG_APP_USER):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(
                    host="127.0.0.1", port=port, user=user, password="guess", dbname="postgres"
                )
        with psycopg.connect(services.database_url) as conn:
            assert conn.execute(
                "select current_user, rolsuper from pg_roles where rolname = current_user"
            ).fetchone() == (PG_APP_USER, False)
        assert (tmp_path / "postgres-credentials.json").stat().st_mode & 0o077 == 0
        with psycopg.connect(services.database_owner_url) as conn:
            listen = conn.execute("show listen_addresses").fetchone()
        assert listen == ("127.0.0.1",)


def test_a_cluster_that_trusted_everyone_gets_passwords(tmp_path: Path) -> None:
    with EmbeddedServices(tmp_path) as services:
        assert services.database_owner_url
        with psycopg.connect(services.database_owner_url, autocommit=True) as conn:
            # As clusters made before passwords were: no password, trust for every local user.
            conn.execute("alter role postgres password null")
    (tmp_path / "postgres" / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
    )
    with EmbeddedServices(tmp_path) as again:
        assert again.database_owner_url and again.database_url
        port = _port(again.database_url)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host="127.0.0.1", port=port, user=PG_SUPERUSER, dbname="postgres")
        with psycopg.connect(again.database_owner_url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_second_start_reuses_running_servers(tmp_path: Path) -> None:
    first = EmbeddedServices(tmp_path)
    first.start()
    try:
        urls = (first.database_url, first.redis_url)
        pids = first.pids
        first.start()  # idempotent
        assert (first.database_url, first.redis_url) == urls and first.pids == pids

        second = EmbeddedServices(tmp_path)
        second.start()
        assert (second.database_url, second.redis_url) == urls
        assert second.pids == pids
        # The second user does not own the servers: stopping it leaves them to the first.
        second.stop()
        assert all(pid_alive(pid) for pid in pids.values())
        with psycopg.connect(urls[0] or "") as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        with _redis(urls[1]) as client:
            assert client.ping()
    finally:
        first.stop()
    _wait_gone(list(pids.values()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_servers_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from app.embedded import EmbeddedServices
        services = EmbeddedServices(Path({str(tmp_path)!r}))
        services.start()
        import psycopg, redis
        with psycopg.connect(services.database_owner_url, autocommit=True) as conn:
            conn.execute("create table t (v text)")
            conn.execute("insert into t values ('before the kill')")
        with redis.Redis.from_url(services.redis_url) as client:
            client.set("k", "before the kill")
        print(json.dumps(services.pids), flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pids: dict[str, int] = json.loads(parent.stdout.readline())
        assert set(pids) == {"postgres", "redis"}
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    _wait_gone(list(pids.values()))

    # The next run takes the data dir over cleanly, with the data written before the kill.
    with EmbeddedServices(tmp_path) as services:
        assert services.database_owner_url is not None
        with psycopg.connect(services.database_owner_url) as conn:
            assert conn.execute("select v from t").fetchone() == ("before the kill",)
        with _redis(services.redis_url) as client:
            assert client.get("k") == "before the kill"


def test_restart_after_postmaster_was_killed(tmp_path: Path) -> None:
    crashed = EmbeddedServices(tmp_path, redis=False)
    crashed.start()
    pid = crashed.pids["postgres"]
    os.kill(pid, signal.SIGKILL)
    _wait_gone([pid])
    assert (tmp_path / "postgres" / "postmaster.pid").exists()
    crashed.stop()  # its server is already gone: nothing to do, no error

    with EmbeddedServices(tmp_path, redis=False) as services:
        assert services.redis_url is None and services.database_url is not None
        with psycopg.connect(services.database_url) as conn:
            assert conn.execute("select 1").fetchone() == (1,)


def test_stale_postmaster_pid_of_an_unrelated_process(tmp_path: Path) -> None:
    with EmbeddedServices(tmp_path, redis=False):
        pass
    # After a reboot the pid in a leftover postmaster.pid may belong to anything.
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "postgres" / "postmaster.pid"
        pid_file.write_text(f"{unrelated.pid}\n{tmp_path / 'postgres'}\n0\n5432\n\n\n\nready\n")
        with EmbeddedServices(tmp_path, redis=False) as services:
            assert services.database_url is not None
            with psycopg.connect(services.database_url) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()
