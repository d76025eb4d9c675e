"""Signed releases: the statement and its verification (what a plugin client runs), the
plugin_releases repository on real PostgreSQL, and `selfheal keys` / `selfheal release` as
real subprocesses."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import create_engine, create_sessionmaker
from app.core.settings import Settings
from app.releases import repository
from app.releases.repository import version_sort_key
from app.releases.service import ReleaseConflict, add_release
from app.releases.signing import (
    SignatureRejected,
    Signer,
    SigningKeyError,
    check_artifact,
    generate_key,
    key_path,
    load_signer,
    parse_statement,
    public_key_b64,
    sign_statement,
    verify_payload,
)
from tests.support.cli import one_json_object, runner
from tests.support.databases import libpq
from tests.support.settings import APP_LOGIN, TEST_SECRET_KEY

T = TypeVar("T")

SHA = "ab" * 32
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
EXPIRES = datetime(2026, 12, 23, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return generate_key(tmp_path / "keys" / "release-signing.pem")


def payload_for(
    signer: Signer,
    *,
    plugin: str = "payments",
    version: str = "1.2.3",
    sha256: str = SHA,
    expires_at: datetime = EXPIRES,
) -> dict[str, str]:
    signed, signature = sign_statement(
        signer, plugin=plugin, version=version, sha256=sha256, expires_at=expires_at
    )
    return {
        "version": version,
        "artifact_url": f"https://releases.example/{plugin}/{version}.zip",
        "sha256": sha256,
        "signature": signature,
        "signed": signed,
    }


async def in_tx(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    engine = create_engine(settings, role="test")
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            return await work(session)
    finally:
        await engine.dispose()


def artifact(tmp_path: Path, name: str, content: bytes | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(content if content is not None else name.encode())
    return path


# --- the statement and its verification ------------------------------------------------------


def test_statement_is_canonical_json_and_round_trips(signer):
    payload = payload_for(signer)
    assert payload["signed"] == (
        '{"expires_at":"2026-12-23T12:00:00Z","plugin":"payments",'
        f'"sha256":"{SHA}","v":1,"version":"1.2.3"}}'
    )
    assert len(base64.b64decode(payload["signature"], validate=True)) == 64
    statement = verify_payload(signer.public_key_b64, payload, plugin_name="payments", now=NOW)
    assert (statement.plugin, statement.version, statement.sha256) == ("payments", "1.2.3", SHA)
    assert statement.expires_at == EXPIRES
    # The pinned form of the key: base64 of the raw 32 bytes.
    assert len(base64.b64decode(signer.public_key_b64, validate=True)) == 32
    assert public_key_b64(signer) == public_key_b64(signer.private_key.public_key())


def test_expiry_is_written_in_utc_whatever_the_zone(signer):
    in_paris = EXPIRES.astimezone(ZoneInfo("Europe/Paris"))
    payload = payload_for(signer, expires_at=in_paris)
    assert '"expires_at":"2026-12-23T12:00:00Z"' in payload["signed"]


def _tamper_version(payload: dict[str, str], signer: Signer) -> None:
    payload["version"] = "1.2.4"


def _tamper_sha(payload: dict[str, str], signer: Signer) -> None:
    payload["sha256"] = "cd" * 32


def _tamper_statement(payload: dict[str, str], signer: Signer) -> None:
    payload["signed"] = payload["signed"].replace("1.2.3", "1.2.4")
    payload["version"] = "1.2.4"


def _other_plugins_statement(payload: dict[str, str], signer: Signer) -> None:
    payload.update(payload_for(signer, plugin="shipping"))


def _expired(payload: dict[str, str], signer: Signer) -> None:
    payload.update(payload_for(signer, expires_at=NOW))


def _wrong_key(payload: dict[str, str], signer: Signer) -> None:
    other = Signer(Ed25519PrivateKey.generate())
    payload.update(payload_for(other))


def _bad_base64(payload: dict[str, str], signer: Signer) -> None:
    payload["signature"] = "not base64!"


def _missing_signed(payload: dict[str, str], signer: Signer) -> None:
    del payload["signed"]


def _not_canonical(payload: dict[str, str], signer: Signer) -> None:
    # Validly signed, but not the one spelling of the statement: refused all the same.
    spaced = payload["signed"].replace(",", ", ").encode()
    payload["signed"] = spaced.decode()
    payload["signature"] = base64.b64encode(signer.private_key.sign(spaced)).decode()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_tamper_version, "the payload's version '1.2.4' is not the signed version '1.2.3'"),
        (_tamper_sha, "the payload's sha256 is not the signed sha256"),
        (_tamper_statement, "the signature does not verify with the pinned public key"),
        (_other_plugins_statement, "the statement is for plugin 'shipping', not 'payments'"),
        (_expired, "the statement expired at 2026-11-23T12:00:00Z"),
        (_wrong_key, "the signature does not verify with the pinned public key"),
        (_bad_base64, "the signature is not valid base64"),
        (_missing_signed, "payload field 'signed' is missing, empty or not a string"),
        (_not_canonical, "the signed statement is not in canonical form"),
    ],
)
def test_verify_payload_rejects_with_the_reason(signer, tamper, reason):
    payload = payload_for(signer)
    tamper(payload, signer)
    with pytest.raises(SignatureRejected) as caught:
        verify_payload(signer.public_key_b64, payload, plugin_name="payments", now=NOW)
    assert caught.value.reason == reason


def test_a_malformed_pinned_key_rejects_everything(signer):
    with pytest.raises(SignatureRejected, match="pinned public key must be 32 bytes"):
        verify_payload(
            base64.b64encode(b"short").decode(),
            payload_for(signer),
            plugin_name="payments",
            now=NOW,
        )


def test_check_artifact_compares_the_downloaded_bytes(signer, tmp_path):
    good = artifact(tmp_path, "good.zip", b"the release")
    payload = payload_for(signer, sha256=hashlib.sha256(b"the release").hexdigest())
    statement = verify_payload(signer.public_key_b64, payload, plugin_name="payments", now=NOW)
    check_artifact(statement, good)
    with pytest.raises(SignatureRejected, match="is not the signed sha256"):
        check_artifact(statement, artifact(tmp_path, "bad.zip", b"something else"))


def test_parse_statement_refuses_extra_fields():
    with pytest.raises(ValueError, match="exactly the keys"):
        parse_statement(
            orjson.dumps(
                {
                    "v": 1,
                    "plugin": "p",
                    "version": "1",
                    "sha256": SHA,
                    "expires_at": "2026-12-23T12:00:00Z",
                    "extra": 1,
                },
                option=orjson.OPT_SORT_KEYS,
            ).decode()
        )


# --- the key file ------------------------------------------------------------------------------


def test_generate_key_is_private_and_never_overwritten_without_force(tmp_path):
    path = tmp_path / "data" / "keys" / "release-signing.pem"
    first = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key(path)
    assert path.read_bytes() == before
    assert load_signer(path).public_key_b64 == first.public_key_b64
    second = generate_key(path, force=True)
    assert second.public_key_b64 != first.public_key_b64
    assert load_signer(path).public_key_b64 == second.public_key_b64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["release-signing.pem"]


def test_load_signer_names_the_problem(tmp_path):
    with pytest.raises(SigningKeyError, match="selfheal keys generate"):
        load_signer(tmp_path / "missing.pem")
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        load_signer(ec)
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_signer(junk)


def test_key_path_follows_the_settings(tmp_path):
    assert key_path(Settings(data_dir=tmp_path)) == tmp_path / "keys" / "release-signing.pem"
    assert key_path(Settings(data_dir=tmp_path, signing_key_file=tmp_path / "k.pem")) == (
        tmp_path / "k.pem"
    )


# --- repository and service ---------------------------------------------------------------------


def test_versions_compare_numerically():
    versions = ["1.9.0", "1.10.0", "1.2.3", "1.10.0-rc1", "2.0", "10.0.0", "nightly"]
    ordered = sorted(versions, key=version_sort_key, reverse=True)
    assert ordered == ["10.0.0", "2.0", "1.10.0", "1.10.0-rc1", "1.9.0", "1.2.3", "nightly"]


async def test_add_release_stores_a_payload_the_plugin_accepts(settings, signer, tmp_path, db):
    path = artifact(tmp_path, "payments-1.2.3.zip", b"payments 1.2.3")
    added = await in_tx(
        settings,
        lambda s: add_release(
            s, signer, plugin="payments", version="1.2.3", artifact=path, url=None, valid_days=30
        ),
    )
    assert added.outcome == "added"
    # The control plane keeps the bytes and serves them itself.
    assert added.release.artifact_url == "/api/plugins/releases/payments/1.2.3/artifact"
    assert added.release.sha256 == hashlib.sha256(b"payments 1.2.3").hexdigest()
    assert db.execute(
        "SELECT sha256, size_bytes, content FROM plugin_release_artifacts"
        " WHERE plugin_name = 'payments' AND version = '1.2.3'"
    ).fetchone() == (added.release.sha256, 14, b"payments 1.2.3")

    payload = await in_tx(
        settings,
        lambda s: repository.command_payload(
            s, "payments", "1.2.3", base_url="https://selfheal.example"
        ),
    )
    assert payload is not None
    assert set(payload) == {"version", "artifact_url", "sha256", "signature", "signed"}
    assert payload["artifact_url"] == (
        "https://selfheal.example/api/plugins/releases/payments/1.2.3/artifact"
    )
    statement = verify_payload(signer.public_key_b64, payload, plugin_name="payments")
    assert statement.version == "1.2.3"
    assert timedelta(days=29) < statement.expires_at - datetime.now(UTC) <= timedelta(days=30)
    assert (
        await in_tx(settings, lambda s: repository.command_payload(s, "payments", "9.9.9")) is None
    )
    assert (
        await in_tx(settings, lambda s: repository.command_payload(s, "shipping", "1.2.3")) is None
    )
    row = db.execute(
        "SELECT signed_statement, signature FROM plugin_releases WHERE version = '1.2.3'"
    ).fetchone()
    assert row == (payload["signed"], payload["signature"])


async def test_add_release_is_idempotent_and_refuses_other_bytes(settings, signer, tmp_path, db):
    path = artifact(tmp_path, "a.zip", b"release bytes")
    url = "https://releases.example/payments/1.2.3.zip"

    async def again(**options: Any) -> Any:
        return await in_tx(
            settings,
            lambda s: add_release(
                s, signer, plugin="payments", version="1.2.3", **{"valid_days": 30, **options}
            ),
        )

    first = await again(artifact=path, url=url)
    second = await again(artifact=path, url=url)
    assert (first.outcome, second.outcome) == ("added", "unchanged")
    assert second.release.signature == first.release.signature
    # Same bytes from another directory, no --url: still unchanged, the stored URL stays.
    (tmp_path / "elsewhere").mkdir()
    copy = artifact(tmp_path / "elsewhere", "a.zip", b"release bytes")
    third = await again(artifact=copy, url=None)
    assert third.outcome == "unchanged"
    assert third.release.artifact_url == url

    other = artifact(tmp_path, "b.zip", b"other bytes")
    with pytest.raises(ReleaseConflict, match="already released with sha256"):
        await again(artifact=other, url=url)
    assert db.execute("SELECT count(*), min(sha256) FROM plugin_releases").fetchone() == (
        1,
        first.release.sha256,
    )

    # A new URL for the same bytes (a mirror) is an update, not a new signature.
    moved = await again(artifact=path, url="https://mirror.example/a.zip")
    assert moved.outcome == "updated"
    assert moved.release.artifact_url == "https://mirror.example/a.zip"
    assert moved.release.signed_statement == first.release.signed_statement

    # --renew signs again (a new expiry); so does a different key.
    renewed = await again(artifact=path, url=None, renew=True, valid_days=60)
    assert renewed.outcome == "updated"
    assert renewed.release.expires_at > first.release.expires_at
    new_key = generate_key(tmp_path / "new.pem")
    rekeyed = await in_tx(
        settings,
        lambda s: add_release(
            s, new_key, plugin="payments", version="1.2.3", artifact=path, valid_days=30
        ),
    )
    assert rekeyed.outcome == "updated"
    verify_payload(new_key.public_key_b64, rekeyed.release.payload(), plugin_name="payments")


async def test_expired_releases_are_not_handed_out_and_are_signed_again(settings, signer, tmp_path):
    path = artifact(tmp_path, "old.zip")
    long_ago = datetime.now(UTC) - timedelta(days=40)
    await in_tx(
        settings,
        lambda s: add_release(
            s,
            signer,
            plugin="payments",
            version="1.0.0",
            artifact=path,
            valid_days=30,
            now=long_ago,
        ),
    )
    assert (
        await in_tx(settings, lambda s: repository.command_payload(s, "payments", "1.0.0")) is None
    )
    assert await in_tx(settings, lambda s: repository.candidate_versions(s, "payments")) == []
    again = await in_tx(
        settings,
        lambda s: add_release(
            s, signer, plugin="payments", version="1.0.0", artifact=path, valid_days=30
        ),
    )
    assert again.outcome == "updated"
    assert await in_tx(settings, lambda s: repository.command_payload(s, "payments", "1.0.0"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"plugin": "bad name"}, "--plugin 'bad name' is not valid"),
        ({"version": "latest"}, "--version 'latest' is not valid"),
        ({"valid_days": 0}, "--valid-days must be between 1 and 3650"),
        ({"url": "not a url"}, "is not an http\\(s\\) URL"),
        ({"url": "file:///srv/payments.zip"}, "is not an http\\(s\\) URL"),
        ({"artifact": Path("/nonexistent/file.zip")}, "no such file"),
    ],
)
async def test_add_release_validates_its_input(settings, signer, tmp_path, options, message):
    values: dict[str, Any] = {
        "plugin": "payments",
        "version": "1.2.3",
        "artifact": artifact(tmp_path, "x.zip"),
        "url": None,
        "valid_days": 30,
        **options,
    }
    with pytest.raises(ValueError, match=message):
        await in_tx(settings, lambda s: add_release(s, signer, **values))


async def test_candidates_newest_first_without_quarantined(settings, signer, tmp_path):
    for version in ["1.9.0", "1.10.0", "1.2.3", "1.10.0-rc1", "2.0.0"]:
        path = artifact(tmp_path, f"p-{version}.zip")
        await in_tx(
            settings,
            lambda s, v=version, p=path: add_release(
                s, signer, plugin="payments", version=v, artifact=p, valid_days=30
            ),
        )
    await in_tx(
        settings,
        lambda s: add_release(
            s,
            signer,
            plugin="shipping",
            version="9.0.0",
            artifact=artifact(tmp_path, "s.zip"),
            valid_days=30,
        ),
    )

    async def candidates(exclude: str | None = None) -> list[str]:
        return await in_tx(
            settings, lambda s: repository.candidate_versions(s, "payments", exclude=exclude)
        )

    assert await candidates() == ["2.0.0", "1.10.0", "1.10.0-rc1", "1.9.0", "1.2.3"]
    assert await candidates("1.10.0") == ["2.0.0", "1.10.0-rc1", "1.9.0", "1.2.3"]

    quarantine = repository.quarantine
    assert await in_tx(settings, lambda s: quarantine(s, "payments", "2.0.0", "rolled back 3x"))
    assert not await in_tx(settings, lambda s: quarantine(s, "payments", "2.0.0", "again"))
    assert not await in_tx(settings, lambda s: quarantine(s, "payments", "7.7.7", "missing"))
    assert await candidates() == ["1.10.0", "1.10.0-rc1", "1.9.0", "1.2.3"]
    assert await in_tx(settings, lambda s: repository.quarantined_versions(s, "payments")) == {
        "2.0.0"
    }
    # Quarantine keeps the payload: an operator may still apply the version by hand.
    assert await in_tx(settings, lambda s: repository.command_payload(s, "payments", "2.0.0"))
    row = await in_tx(settings, lambda s: repository.get_release(s, "payments", "2.0.0"))
    assert row is not None and row.quarantine_reason == "rolled back 3x"

    assert await in_tx(settings, lambda s: repository.unquarantine(s, "payments", "2.0.0"))
    assert not await in_tx(settings, lambda s: repository.unquarantine(s, "payments", "2.0.0"))
    assert (await candidates())[0] == "2.0.0"
    assert await in_tx(settings, lambda s: repository.quarantined_versions(s, "payments")) == set()

    listed = await in_tx(settings, lambda s: repository.list_releases(s))
    assert [(r.plugin_name, r.version) for r in listed] == [
        ("payments", "2.0.0"),
        ("payments", "1.10.0"),
        ("payments", "1.10.0-rc1"),
        ("payments", "1.9.0"),
        ("payments", "1.2.3"),
        ("shipping", "9.0.0"),
    ]
    only = await in_tx(settings, lambda s: repository.list_releases(s, "shipping"))
    assert [r.version for r in only] == ["9.0.0"]


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture
def run(settings, servers, tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SELFHEAL_")
        and key not in ("DATABASE_URL", "REDIS_URL", "PORT", "LOG_LEVEL")
    }
    env.update(
        DATABASE_URL=libpq(settings.database_url),
        REDIS_URL=servers.redis_url,
        SELFHEAL_REDIS_PREFIX=settings.redis_prefix,
        SELFHEAL_SECRET_KEY=TEST_SECRET_KEY,
        SELFHEAL_DATA_DIR="selfheal-data",
    )
    return runner(env, tmp_path)


def test_keys_generate_creates_once_and_prints_the_public_key(run, tmp_path):
    path = tmp_path / "selfheal-data" / "keys" / "release-signing.pem"
    result = run("keys", "generate", "--json")
    assert result.returncode == 0, result.stderr
    created = one_json_object(result.stdout)
    assert created == {"public_key": created["public_key"], "key_file": str(path), "created": True}
    assert created["public_key"] == load_signer(path).public_key_b64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    before = path.read_bytes()

    again = run("keys", "generate", "--json")
    assert again.returncode == 0, again.stderr
    assert one_json_object(again.stdout) == {**created, "created": False}
    assert path.read_bytes() == before

    text = run("keys", "generate")
    assert text.returncode == 0
    assert created["public_key"] in text.stdout
    assert "exists already" in text.stderr

    forced = run("keys", "generate", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    replaced = one_json_object(forced.stdout)
    assert replaced["created"] is True
    assert replaced["public_key"] != created["public_key"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keys_generate_honours_the_key_file_setting(run, tmp_path):
    result = run("keys", "generate", "--json", SELFHEAL_SIGNING_KEY_FILE=str(tmp_path / "k.pem"))
    assert result.returncode == 0, result.stderr
    assert one_json_object(result.stdout)["key_file"] == str(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").exists()
    assert not (tmp_path / "selfheal-data").exists()


def test_release_add_json_list_and_quarantine(run, tmp_path, db):
    missing_key = run(
        "release", "add", "--plugin", "payments", "--version", "1.2.3", "--artifact", "a.zip"
    )
    assert missing_key.returncode == 2  # the artifact does not exist yet
    artifact(tmp_path, "a.zip", b"payments 1.2.3")
    no_key = run(
        "release", "add", "--plugin", "payments", "--version", "1.2.3", "--artifact", "a.zip"
    )
    assert no_key.returncode == 1
    assert "selfheal keys generate" in no_key.stderr

    public_key = one_json_object(run("keys", "generate", "--json").stdout)["public_key"]
    args = ("release", "add", "--plugin", "payments", "--version", "1.2.3", "--artifact", "a.zip")
    result = run(*args, "--url", "https://releases.example/a.zip", "--valid-days", "10", "--json")
    assert result.returncode == 0, result.stderr
    data = one_json_object(result.stdout)
    assert data["status"] == "added"
    assert data["sha256"] == hashlib.sha256(b"payments 1.2.3").hexdigest()
    assert data["artifact_url"] == "https://releases.example/a.zip"
    assert data["public_key"] == public_key
    expires_at = datetime.fromisoformat(data["expires_at"])
    assert timedelta(days=9) < expires_at - datetime.now(UTC) <= timedelta(days=10)

    row = db.execute(
        "SELECT version, artifact_url, sha256, signature, signed_statement FROM plugin_releases"
    ).fetchone()
    payload = dict(
        zip(("version", "artifact_url", "sha256", "signature", "signed"), row, strict=True)
    )
    verify_payload(public_key, payload, plugin_name="payments")

    same = run(*args, "--json")
    assert same.returncode == 0, same.stderr
    assert one_json_object(same.stdout)["status"] == "unchanged"

    artifact(tmp_path, "b.zip", b"other bytes")
    conflict = run(
        "release", "add", "--plugin", "payments", "--version", "1.2.3", "--artifact", "b.zip"
    )
    assert conflict.returncode == 1
    assert "already released with sha256" in conflict.stderr
    assert conflict.stdout == ""

    bad = run("release", "add", "--plugin", "payments", "--version", "x", "--artifact", "b.zip")
    assert bad.returncode == 2
    assert "--version 'x' is not valid" in bad.stderr

    listed = one_json_object(run("release", "list", "--json").stdout)
    assert [(r["plugin"], r["version"], r["quarantined_at"]) for r in listed["releases"]] == [
        ("payments", "1.2.3", None)
    ]

    q = run(
        "release",
        "quarantine",
        "--plugin",
        "payments",
        "--version",
        "1.2.3",
        "--reason",
        "broken webhooks",
        "--json",
    )
    assert q.returncode == 0, q.stderr
    assert one_json_object(q.stdout) == {
        "plugin": "payments",
        "version": "1.2.3",
        "quarantined": True,
        "changed": True,
        "quarantine_reason": "broken webhooks",
    }
    assert db.execute("SELECT quarantine_reason FROM plugin_releases").fetchone() == (
        "broken webhooks",
    )
    listed = one_json_object(run("release", "list", "--plugin", "payments", "--json").stdout)
    assert listed["releases"][0]["quarantine_reason"] == "broken webhooks"

    u = run("release", "unquarantine", "--plugin", "payments", "--version", "1.2.3", "--json")
    assert u.returncode == 0, u.stderr
    assert one_json_object(u.stdout)["quarantined"] is False
    u2 = run("release", "unquarantine", "--plugin", "payments", "--version", "1.2.3", "--json")
    assert one_json_object(u2.stdout)["changed"] is False

    missing = run(
        "release", "quarantine", "--plugin", "payments", "--version", "9.9.9", "--reason", "x"
    )
    assert missing.returncode == 1
    assert "no release payments 9.9.9" in missing.stderr


async def test_release_changes_and_tenant_blocks_are_audited(run, tmp_path, db, plugin, settings):
    """Quarantine and unquarantine from the command line, a block for one tenant as the
    healing loop records it: each lands in audit_log with who did it, and the block with its
    tenant."""
    assert run("keys", "generate", "--json").returncode == 0
    artifact(tmp_path, "a.zip", b"payments 1.2.3")
    args = ("--plugin", plugin.name, "--version", "1.2.3")
    assert run("release", "add", *args, "--artifact", "a.zip").returncode == 0
    assert run("release", "quarantine", *args, "--reason", "broken webhooks").returncode == 0
    await in_tx(
        settings,
        lambda s: repository.block_for_tenant(s, plugin.name, "1.2.3", plugin.tenant, "3x here"),
    )
    assert run("release", "unquarantine", *args).returncode == 0

    release_id = db.execute("SELECT id::text FROM plugin_releases").fetchone()[0]
    rows = db.execute(
        "SELECT entity, action, entity_id, tenant_id, db_user, application_name,"
        "       coalesce(new, old) ->> 'quarantine_reason', coalesce(new, old) ->> 'reason'"
        " FROM audit_log WHERE entity IN ('plugin_releases', 'plugin_release_tenant_blocks')"
        " ORDER BY id"
    ).fetchall()
    assert [row[:4] for row in rows] == [
        ("plugin_releases", "insert", release_id, None),
        ("plugin_releases", "update", release_id, None),  # quarantined
        (
            "plugin_release_tenant_blocks",
            "insert",
            f"{plugin.name}/1.2.3/{plugin.tenant}",
            plugin.tenant,
        ),
        (
            "plugin_release_tenant_blocks",
            "delete",
            f"{plugin.name}/1.2.3/{plugin.tenant}",
            plugin.tenant,
        ),
        ("plugin_releases", "update", release_id, None),  # unquarantined
    ]
    assert [row[6] for row in rows if row[0] == "plugin_releases"] == [
        None,
        "broken webhooks",
        None,
    ]
    assert rows[2][7] == "3x here"
    # Made by the application's login (the CLI's and the loop's sessions), named as such.
    assert {row[4] for row in rows} == {APP_LOGIN}
    assert rows[1][5] == "selfheal-cli"
