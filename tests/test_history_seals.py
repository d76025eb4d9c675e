"""The keyed seals over the history (app/audit, migration 0013): what a database owner who
disables the triggers and re-chains the database's own hash chain changes is still caught by
`selfheal audit verify`, which names the first altered row; seals removed from the end are
caught by the exported head; the workers seal and export at default settings."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.audit.seals import Head, derive_key, keys_of
from tests.support.cli import one_json_object, runner
from tests.support.processes import running_worker
from tests.support.settings import settings_env


def make_installation(db: psycopg.Connection[Any]) -> uuid.UUID:
    db.execute("INSERT INTO tenants (id) VALUES ('t1') ON CONFLICT DO NOTHING")
    row = db.execute(
        "INSERT INTO merchant_plugins (tenant_id, plugin_name, plugin_version)"
        " VALUES ('t1', 'payments', '1.2.2') RETURNING id"
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def history(db: psycopg.Connection[Any], attempts: int = 3) -> list[uuid.UUID]:
    """Attempts that went pending, applying, then failed: three events each; and a policy
    change or two in audit_log."""
    installation = make_installation(db)
    ids = []
    for _ in range(attempts):
        row = db.execute(
            "INSERT INTO plugin_autopatch_attempts (installation_id, from_version, to_version,"
            " status) VALUES (%s, '1.2.2', '1.2.3', 'pending') RETURNING id",
            (installation,),
        ).fetchone()
        assert row is not None
        ids.append(uuid.UUID(str(row[0])))
        db.execute("UPDATE plugin_autopatch_attempts SET status = 'applying' WHERE id = %s", row)
        db.execute("UPDATE plugin_autopatch_attempts SET status = 'failed' WHERE id = %s", row)
    db.execute("UPDATE ops_policy SET autopatch_max_severity = 'high' WHERE id = 1")
    return ids


def rechain_from(db: psycopg.Connection[Any], first: int) -> None:
    """What an owner who wants a quiet rewrite does after editing event `first`: recompute the
    database's hash chain from there on, so that selfheal_verify_attempt_events() says intact."""
    previous = db.execute(
        "SELECT hash FROM plugin_autopatch_attempt_events WHERE id < %s ORDER BY id DESC LIMIT 1",
        (first,),
    ).fetchone()
    prev = previous[0] if previous else bytes(32)
    for (event_id,) in db.execute(
        "SELECT id FROM plugin_autopatch_attempt_events WHERE id >= %s ORDER BY id", (first,)
    ).fetchall():
        row = db.execute(
            "UPDATE plugin_autopatch_attempt_events e SET prev_hash = %s,"
            " hash = selfheal_attempt_event_hash(%s, e.id, e.attempt_id, e.at, e.operation,"
            "   e.old_status, e.new_status, e.db_user, e.application_name, e.actor, e.row_data)"
            " WHERE e.id = %s RETURNING hash",
            (prev, prev, event_id),
        ).fetchone()
        assert row is not None
        prev = row[0]


def triggers(db: psycopg.Connection[Any], table: str, action: str) -> None:
    """The owner turning a table's triggers off, or back on as they were (ENABLE ALWAYS)."""
    names = db.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
        (table,),
    ).fetchall()
    for (name,) in names:
        verb = "DISABLE" if action == "off" else "ENABLE ALWAYS"
        db.execute(f'ALTER TABLE {table} {verb} TRIGGER "{name}"')


@pytest.fixture
def cli(settings, tmp_path: Path):
    return runner(settings_env(settings), tmp_path)


def seal(cli) -> dict[str, Any]:
    done = cli("audit", "seal", "--json")
    assert done.returncode == 0, done.stderr
    return one_json_object(done.stdout)


def verify(cli) -> subprocess.CompletedProcess[str]:
    return cli("audit", "verify")


def test_an_untouched_history_verifies(db, cli, settings):
    history(db)
    sealed = seal(cli)
    assert sealed["sealed"] > 0
    done = verify(cli)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "intact" in done.stdout
    # Nothing new: sealing again seals nothing and the chain still holds.
    assert seal(cli)["sealed"] == 0
    assert verify(cli).returncode == 0


def test_a_rewritten_and_rechained_event_is_caught_and_named(db, cli):
    history(db)
    seal(cli)
    target = db.execute(
        "SELECT id FROM plugin_autopatch_attempt_events WHERE new_status = 'failed'"
        " ORDER BY id LIMIT 1"
    ).fetchone()
    assert target is not None
    triggers(db, "plugin_autopatch_attempt_events", "off")
    db.execute(
        "UPDATE plugin_autopatch_attempt_events SET new_status = 'success',"
        " row_data = jsonb_set(row_data, '{status}', '\"success\"') WHERE id = %s",
        target,
    )
    rechain_from(db, target[0])
    triggers(db, "plugin_autopatch_attempt_events", "on")
    # The database's own check is fooled ...
    assert db.execute("SELECT selfheal_verify_attempt_events()").fetchone() == (None,)
    # ... the keyed seals are not.
    done = verify(cli)
    assert done.returncode == 1, done.stdout
    assert f"first altered row: plugin_autopatch_attempt_events id {target[0]}" in done.stdout
    result = cli("audit", "verify", "--json")
    data = one_json_object(result.stdout)
    assert data["first_altered"] == {"log": "plugin_autopatch_attempt_events", "id": target[0]}
    assert data["intact"] is False


def test_a_rewritten_audit_row_is_caught(db, cli):
    history(db)
    seal(cli)
    entry = db.execute(
        "SELECT id FROM audit_log WHERE entity = 'ops_policy' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert entry is not None
    triggers(db, "audit_log", "off")
    db.execute("UPDATE audit_log SET db_user = 'nobody', actor = 'nobody' WHERE id = %s", entry)
    triggers(db, "audit_log", "on")
    done = verify(cli)
    assert done.returncode == 1
    assert f"first altered row: audit_log id {entry[0]}" in done.stdout


def test_removing_the_last_rows_and_their_seals_is_caught_by_the_exported_head(db, cli, settings):
    history(db)
    seal(cli)
    head = Head.from_json(settings.audit_head_path.read_text())
    last = db.execute("SELECT log, row_id FROM history_seals ORDER BY seq DESC LIMIT 2").fetchall()
    for table in ("audit_log", "plugin_autopatch_attempt_events", "history_seals"):
        triggers(db, table, "off")
    for log, row_id in last:
        db.execute(f"DELETE FROM {log} WHERE id = %s", (row_id,))
    db.execute("DELETE FROM history_seals WHERE seq > %s", (head.seq - 2,))
    for table in ("audit_log", "plugin_autopatch_attempt_events", "history_seals"):
        triggers(db, table, "on")
    done = verify(cli)
    assert done.returncode == 1, done.stdout
    assert f"seal #{head.seq}, the head exported at" in done.stdout


def test_seals_remade_without_the_key_do_not_pass(db, cli, settings):
    history(db)
    seal(cli)
    # An owner who edits a row and writes a seal for it of their own making (with any key
    # other than ours).
    target = db.execute("SELECT min(id) FROM audit_log").fetchone()
    assert target is not None
    triggers(db, "audit_log", "off")
    triggers(db, "history_seals", "off")
    db.execute("UPDATE audit_log SET actor = 'nobody' WHERE id = %s", target)
    db.execute(
        "UPDATE history_seals SET mac = sha256(mac) WHERE log = 'audit_log' AND row_id = %s",
        target,
    )
    triggers(db, "audit_log", "on")
    triggers(db, "history_seals", "on")
    done = verify(cli)
    assert done.returncode == 1
    assert f"first altered row: audit_log id {target[0]}" in done.stdout
    # The head exported before still names the old seal: the database no longer agrees.
    head = json.loads(settings.audit_head_path.read_text())
    assert head["seq"] > 0


def test_a_row_added_behind_the_sealers_back_is_reported(db, cli):
    history(db)
    seal(cli)
    triggers(db, "audit_log", "off")
    db.execute(
        # Slipped in among old rows (an id the sealer has long passed), an hour back.
        "INSERT INTO audit_log (id, at, db_user, action, entity, entity_id)"
        " OVERRIDING SYSTEM VALUE"
        " VALUES (-5000, now() - interval '1 hour', 'postgres', 'update', 'ops_policy', '1')"
    )
    triggers(db, "audit_log", "on")
    seal(cli)  # the sealer looks near the newest rows it sealed: this one is far behind
    done = verify(cli)
    assert done.returncode == 1
    assert "was never sealed" in done.stdout


def test_verify_with_another_key_fails_and_names_the_key(db, cli):
    history(db)
    seal(cli)
    done = cli("audit", "verify", SELFHEAL_SECRET_KEY="k" * 48)
    assert done.returncode == 1
    assert "not configured" in done.stdout


async def test_the_worker_seals_and_exports_the_head_at_default_settings(db, settings):
    history(db)
    path = settings.audit_head_path
    path.unlink(missing_ok=True)
    async with running_worker(settings):
        deadline = time.monotonic() + 60
        while not path.exists():
            assert time.monotonic() < deadline, "the worker exported no head"
            await asyncio.sleep(0.2)
    head = Head.from_json(path.read_text())
    sealed = db.execute("SELECT count(*), max(seq) FROM history_seals").fetchone()
    assert sealed is not None and sealed[0] > 0
    assert head.rows == sealed[0] and head.seq == sealed[1]
    assert (path.parent / "heads.jsonl").exists()
    assert path.stat().st_mode & 0o077 == 0


def test_verify_without_an_exported_head_fails_unless_told(db, cli, settings):
    history(db)
    seal(cli)
    settings.audit_head_path.unlink()
    done = verify(cli)
    assert done.returncode == 1
    assert "no exported head" in done.stderr
    done = cli("audit", "verify", "--no-head")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unnoticed" in done.stderr


def test_a_published_previous_key_vouches_for_nothing(settings):
    weak = settings.model_copy(update={"secret_key_previous": "selfheal-dev," + "x" * 12})
    _, known = keys_of(weak)
    assert derive_key("selfheal-dev").id not in known
    assert derive_key("x" * 12).id not in known
    strong = settings.model_copy(update={"secret_key_previous": "p" * 48})
    assert derive_key("p" * 48).id in keys_of(strong)[1]
