"""SELFHEAL_SECRET_KEY (issue 10, "No public default key"): a process that uses the stored
secrets refuses a missing, public or short key whatever SELFHEAL_ENV says; the embedded
PostgreSQL gets a generated key file; `selfheal secrets rotate-key` seals every stored secret
again under a new key while the plugins keep authenticating."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.core.crypto import SecretBox, WeakSecretKey, key_id
from app.core.settings import DEV_SECRET_KEY, Settings
from app.embedded import EmbeddedServices
from app.embedded.secret_key import SecretKeyFileError, load_or_create_secret_key
from app.main import create_app
from tests.support.api import serve
from tests.support.cli import SELFHEAL, one_json_object, runner
from tests.support.databases import connect
from tests.support.plugins import Plugin, register, send_heartbeat
from tests.support.settings import settings_env
from workers.main import build_worker

KEY_31_BYTES = "k" * 31
KEY_32_BYTES = "k" * 32


# --- a weak key refuses to start -------------------------------------------------------------


@pytest.fixture
def real_db_env(servers: Any) -> dict[str, str]:
    """A real (not embedded) database, SELFHEAL_ENV unset (dev): the settings of an install
    that forgot everything but DATABASE_URL. The database is not reachable: a weak key must
    stop the command before it connects anywhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SELFHEAL_") and k not in ("DATABASE_URL", "REDIS_URL", "PORT")
    }
    env.update(
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/unreachable",
        REDIS_URL=servers.redis_url,
        SELFHEAL_DATA_DIR="selfheal-data",
    )
    return env


COMMANDS = [
    ("api",),
    ("worker",),
    ("up",),
    ("plugin", "register", "--tenant", "t1", "--name", "payments", "--version", "1.0.0"),
    ("plugin", "rotate-secret", str(uuid.uuid4())),
    ("notify", "add", "--url", "https://hooks.example.com/x"),
    ("secrets", "rotate-key"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_real_database_with_the_dev_key_refuses_to_start(real_db_env, tmp_path, command):
    run = runner(real_db_env, tmp_path)
    result = run(*command, SELFHEAL_SECRET_KEY=DEV_SECRET_KEY)
    assert result.returncode == 2, result.stderr
    assert "SELFHEAL_SECRET_KEY is 'selfheal-dev', a published placeholder" in result.stderr
    # It says what to do.
    assert "secrets.token_urlsafe(48)" in result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot use PostgreSQL" not in result.stderr  # refused before connecting


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (None, "SELFHEAL_SECRET_KEY is not set"),
        ("changeme", "a published placeholder"),
        (KEY_31_BYTES, "SELFHEAL_SECRET_KEY is 31 bytes long; it needs at least 32"),
        ("é" * 15, "SELFHEAL_SECRET_KEY is 30 bytes long"),  # bytes, not characters
    ],
)
def test_a_missing_or_short_key_refuses_to_start_whatever_selfheal_env_says(
    real_db_env, tmp_path, key, says
):
    run = runner(real_db_env, tmp_path)
    for env in ("dev", None):
        result = run("api", SELFHEAL_SECRET_KEY=key, SELFHEAL_ENV=env)
        assert result.returncode == 2, result.stderr
        assert says in result.stderr
        assert "Traceback" not in result.stderr


def test_a_32_byte_key_is_accepted(settings, tmp_path, db):
    run = runner({**settings_env(settings), "SELFHEAL_SECRET_KEY": KEY_32_BYTES}, tmp_path)
    result = run("plugin", "register", "--tenant", "t1", "--name", "payments", "--version", "1.0.0")
    assert result.returncode == 0, result.stderr
    assert db.execute("SELECT count(*) FROM plugin_secrets").fetchone() == (1,)


def test_the_api_and_the_worker_built_in_process_refuse_a_weak_key(settings):
    """uvicorn app.main:create_app --factory and a worker built by hand, without the CLI."""
    for key in ("", DEV_SECRET_KEY, KEY_31_BYTES):
        weak = settings.model_copy(update={"secret_key": key})
        with pytest.raises(WeakSecretKey, match="SELFHEAL_SECRET_KEY"):
            create_app(weak)
        with pytest.raises(WeakSecretKey, match="SELFHEAL_SECRET_KEY"):
            build_worker(weak, handle_signals=False)


def test_the_default_settings_have_no_key_at_all():
    assert Settings(database_url=None).secret_key == ""
    with pytest.raises(WeakSecretKey, match="is not set"):
        SecretBox(Settings(database_url=None).secret_key)


# --- the embedded PostgreSQL's key file ------------------------------------------------------


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SELFHEAL_") and k not in ("DATABASE_URL", "REDIS_URL", "PORT")
    }
    env.update(SELFHEAL_DATA_DIR=str(data_dir), LOG_LEVEL="warning")
    return env


def test_the_embedded_database_gets_a_generated_key_file_reused_on_the_next_start(tmp_path):
    data_dir = tmp_path / "data"
    run = runner(embedded_env(data_dir), tmp_path)
    assert run("migrate").returncode == 0
    first = run(
        "plugin", "register", "--tenant", "t1", "--name", "p", "--version", "1.0.0", "--json"
    )
    assert first.returncode == 0, first.stderr
    key_file = data_dir / "secret-key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key) >= 64
    assert key != DEV_SECRET_KEY

    # The next start reuses it: a second command seals under the same key.
    second = run(
        "plugin", "register", "--tenant", "t2", "--name", "p", "--version", "1.0.0", "--json"
    )
    assert second.returncode == 0, second.stderr
    assert key_file.read_text().strip() == key

    box = SecretBox(key)
    embedded = EmbeddedServices(data_dir, redis=False)
    embedded.start()
    try:
        assert embedded.database_url
        with connect(embedded.database_url) as conn:
            for issued in (one_json_object(first.stdout), one_json_object(second.stdout)):
                row = conn.execute(
                    "SELECT secret_enc FROM plugin_secrets WHERE installation_id = %s",
                    (issued["plugin_id"],),
                ).fetchone()
                assert row is not None
                sealed = row[0]
                assert bytes(sealed).startswith(b"\x02" + key_id(key))
                assert box.open(bytes(sealed), bound_to=issued["plugin_id"]) == issued["secret"]
    finally:
        embedded.stop()


def test_concurrent_first_starts_agree_on_one_key(tmp_path):
    keys: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(load_or_create_secret_key(tmp_path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret-key"]  # no temporary left


def test_a_key_file_others_can_read_is_refused(tmp_path):
    load_or_create_secret_key(tmp_path)
    (tmp_path / "secret-key").chmod(0o644)
    with pytest.raises(SecretKeyFileError, match="chmod 600"):
        load_or_create_secret_key(tmp_path)


# --- rotation --------------------------------------------------------------------------------


def legacy_seal(secret_key: str, plaintext: str, bound_to: str) -> bytes:
    """A ciphertext as selfheal wrote them before key ids (version 1), byte for byte."""
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"selfheal plugin secrets v1"
    ).derive(secret_key.encode())
    nonce = os.urandom(12)
    return b"\x01" + nonce + AESGCM(derived).encrypt(nonce, plaintext.encode(), bound_to.encode())


async def all_authenticate(client: Any, plugins: list[Plugin]) -> list[int]:
    return [(await send_heartbeat(client, plugin)).status_code for plugin in plugins]


def stored(db: Any) -> list[bytes]:
    rows = db.execute(
        "SELECT secret_enc FROM plugin_secrets UNION ALL"
        " SELECT secret_enc FROM notification_endpoints"
    ).fetchall()
    return [bytes(row[0]) for row in rows]


async def test_rotate_key_reseals_every_secret_while_plugins_keep_authenticating(
    settings, db, tmp_path
):
    old_key, new_key = settings.secret_key, secrets.token_urlsafe(48)
    # A: sealed under the old key. B: an install from before key ids, on the former public
    # default key (the upgrade this rotation exists for).
    a = await register(settings, tenant="merchant-a")
    b = await register(settings, tenant="merchant-b")
    db.execute(
        "UPDATE plugin_secrets SET secret_enc = %s WHERE installation_id = %s",
        (legacy_seal(DEV_SECRET_KEY, b.secret, b.id), b.id),
    )
    endpoint_id, endpoint_secret = uuid.uuid4(), "whsec_" + secrets.token_urlsafe(24)
    db.execute(
        "INSERT INTO notification_endpoints (id, url, secret_enc) VALUES (%s, %s, %s)",
        (
            endpoint_id,
            "https://hooks.example.com/ops",
            SecretBox(old_key).seal(
                endpoint_secret, bound_to=f"notification-endpoint:{endpoint_id}"
            ),
        ),
    )
    rotating = settings.model_copy(
        update={"secret_key": new_key, "secret_key_previous": f"{old_key},{DEV_SECRET_KEY}"}
    )
    rotated = settings.model_copy(update={"secret_key": new_key})

    # Before: the old configuration serves A.
    async with serve(settings) as (_, client):
        assert await all_authenticate(client, [a]) == [200]
    # The new key alone opens nothing yet: what follows depends on the previous keys.
    async with serve(rotated) as (_, client):
        assert await all_authenticate(client, [a, b]) == [401, 401]

    # During: the API runs on the new key with the old ones readable; C is registered under
    # the new key. Old, legacy and new ciphertexts side by side all authenticate, and keep
    # doing so while rotate-key runs (one row per transaction) beside the running API.
    c = await register(rotating, tenant="merchant-c")
    env = {**settings_env(rotating), "SELFHEAL_SECRET_KEY_PREVIOUS": rotating.secret_key_previous}
    async with serve(rotating) as (_, client):
        assert await all_authenticate(client, [a, b, c]) == [200, 200, 200]
        proc = subprocess.Popen(
            [SELFHEAL, "secrets", "rotate-key", "--batch-size", "1", "--json"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        finished = asyncio.create_task(asyncio.to_thread(proc.communicate, timeout=60))
        rounds = 0
        while not finished.done() and rounds < 5:
            assert await all_authenticate(client, [a, b, c]) == [200, 200, 200]
            rounds += 1
            await asyncio.wait({finished}, timeout=0.2)
        out, err = await finished
        assert proc.returncode == 0, err.decode()
        report = orjson.loads(out)
        assert report == {
            "key_id": key_id(new_key).hex(),
            "plugin_secrets_resealed": 2,  # A and B; C already was
            "endpoint_secrets_resealed": 1,
            "unreadable": [],
            "remaining": 0,
        }
        # After, on the same API (the change was announced, the secrets reloaded).
        assert await all_authenticate(client, [a, b, c]) == [200, 200, 200]

    assert all(s.startswith(b"\x02" + key_id(new_key)) for s in stored(db))
    (sealed,) = db.execute(
        "SELECT secret_enc FROM notification_endpoints WHERE id = %s", (endpoint_id,)
    ).fetchone()
    binding = f"notification-endpoint:{endpoint_id}"
    assert SecretBox(new_key).open(bytes(sealed), bound_to=binding) == endpoint_secret

    # The previous keys dropped: everything still authenticates under the new key alone.
    async with serve(rotated) as (_, client):
        assert await all_authenticate(client, [a, b, c]) == [200, 200, 200]

    # Running it again finds nothing to do.
    again = runner(env, tmp_path)("secrets", "rotate-key", "--json")
    assert again.returncode == 0, again.stderr
    assert one_json_object(again.stdout)["plugin_secrets_resealed"] == 0
    assert one_json_object(again.stdout)["remaining"] == 0


async def test_rotate_key_reports_secrets_no_key_opens_and_exits_1(settings, db, tmp_path):
    a = await register(settings, tenant="merchant-a")
    lost = await register(settings, tenant="merchant-lost")
    db.execute(
        "UPDATE plugin_secrets SET secret_enc = %s WHERE installation_id = %s",
        (SecretBox(secrets.token_urlsafe(48)).seal(lost.secret, bound_to=lost.id), lost.id),
    )
    new_key = secrets.token_urlsafe(48)
    env = {
        **settings_env(settings),
        "SELFHEAL_SECRET_KEY": new_key,
        "SELFHEAL_SECRET_KEY_PREVIOUS": settings.secret_key,
    }
    result = runner(env, tmp_path)("secrets", "rotate-key", "--json")
    assert result.returncode == 1
    (lost_row,) = db.execute(
        "SELECT id FROM plugin_secrets WHERE installation_id = %s", (lost.id,)
    ).fetchone()
    report = one_json_object(result.stdout)
    assert report["plugin_secrets_resealed"] == 1
    assert report["unreadable"] == [f"plugin_secrets:{lost_row}"]
    assert report["remaining"] == 1
    assert f"no configured key opens plugin_secrets:{lost_row}" in result.stderr
    assert "SELFHEAL_SECRET_KEY_PREVIOUS" in result.stderr
    # A was sealed again all the same.
    (sealed,) = db.execute(
        "SELECT secret_enc FROM plugin_secrets WHERE installation_id = %s", (a.id,)
    ).fetchone()
    assert SecretBox(new_key).open(bytes(sealed), bound_to=a.id) == a.secret


def test_ciphertexts_carry_the_key_id_and_bind_it():
    old, new = secrets.token_urlsafe(48), secrets.token_urlsafe(48)
    sealed = SecretBox(old).seal("shs_x", bound_to="plugin-1")
    assert sealed[:5] == b"\x02" + key_id(old)
    both = SecretBox(new, previous=[old])
    assert both.open(sealed, bound_to="plugin-1") == "shs_x"
    assert not both.is_current(sealed)
    assert both.is_current(both.reseal(sealed, bound_to="plugin-1"))
    # The key id is authenticated: relabelling a ciphertext as the new key's does not open.
    relabelled = b"\x02" + key_id(new) + sealed[5:]
    with pytest.raises(ValueError):
        both.open(relabelled, bound_to="plugin-1")
    # Nor does it open for another installation.
    with pytest.raises(ValueError):
        both.open(sealed, bound_to="plugin-2")
    # A legacy ciphertext opens with whichever configured key sealed it.
    legacy = legacy_seal(old, "shs_y", "plugin-1")
    assert both.open(legacy, bound_to="plugin-1") == "shs_y"
    with pytest.raises(ValueError, match="neither SELFHEAL_SECRET_KEY nor"):
        SecretBox(new).open(sealed, bound_to="plugin-1")
