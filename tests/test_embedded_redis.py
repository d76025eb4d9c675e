"""The embedded Redis asks for a password (issue 10, item 4): without one, any local user could
write jobs into the queue the workers run. Random, made on first start, kept in the data dir
with mode 0600 (the config that carries it too), handed over in `redis_url`; loopback only."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from app.embedded import EmbeddedServices

pytestmark = pytest.mark.timeout(120)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _anonymous(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def test_the_embedded_redis_needs_its_password(tmp_path: Path) -> None:
    with EmbeddedServices(tmp_path, postgres=False) as services:
        assert services.redis_url is not None
        url = urlsplit(services.redis_url)
        password_file = tmp_path / "redis" / "password"
        assert url.hostname == "127.0.0.1" and url.password
        assert password_file.read_text().strip() == url.password
        assert len(url.password) >= 32
        assert _mode(password_file) == 0o600
        assert _mode(tmp_path / "redis" / "redis.conf") == 0o600
        assert url.port is not None
        with _anonymous(url.port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.set("selfheal-test:anonymous", b"1")
        with redis.Redis.from_url(services.redis_url, decode_responses=True) as client:
            assert client.set("selfheal-test:with-password", "1")
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
            assert client.config_get("protected-mode") == {"protected-mode": "yes"}
        first_url = services.redis_url

    # The same password after a restart: it is kept, not made again.
    with EmbeddedServices(tmp_path, postgres=False) as again:
        assert again.redis_url is not None
        assert urlsplit(again.redis_url).password == urlsplit(first_url).password
        with redis.Redis.from_url(again.redis_url, decode_responses=True) as client:
            assert client.get("selfheal-test:with-password") == "1"


def test_a_server_started_without_a_password_is_given_one(tmp_path: Path) -> None:
    """A server of an earlier version (no password set) still running on the data dir is
    adopted and asks for the password from then on."""
    with EmbeddedServices(tmp_path, postgres=False) as first:
        assert first.redis_url is not None
        port = urlsplit(first.redis_url).port
        assert port is not None
        with redis.Redis.from_url(first.redis_url) as client:
            client.config_set("requirepass", "")  # as before passwords existed
        with _anonymous(port) as anonymous:
            assert anonymous.ping()
        second = EmbeddedServices(tmp_path, postgres=False)
        second.start()
        try:
            assert second.redis_url == first.redis_url
            with _anonymous(port) as anonymous, pytest.raises(redis.AuthenticationError):
                anonymous.set("selfheal-test:anonymous", b"1")
            with redis.Redis.from_url(second.redis_url) as client:
                assert client.ping()
        finally:
            second.stop()
