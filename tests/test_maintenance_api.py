"""Maintenance windows and snoozes over the ops API: create for a tenant or an installation,
snooze by duration, every refusal as a 4xx, list filters, ending early (the row stays), and a
window made through the API keeping detection quiet until it is ended."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.support.detection import beat, tick

WINDOWS = "/api/ops/maintenance-windows"
FIELDS = {
    "id",
    "tenant_id",
    "installation_id",
    "starts_at",
    "ends_at",
    "reason",
    "created_by",
    "created_at",
    "active",
}


def at(moment: datetime) -> str:
    return moment.isoformat()


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def window_rows(db):
    return db.execute(
        "SELECT id::text, tenant_id, installation_id::text, starts_at, ends_at, reason,"
        " created_by FROM maintenance_windows ORDER BY created_at"
    ).fetchall()


def db_now(db) -> datetime:
    return db.execute("SELECT now()").fetchone()[0]


async def create(client, persona, **body):
    return await client.post(WINDOWS, json=body, headers=persona.auth)


# --- create -----------------------------------------------------------------------------------


async def test_operator_opens_a_window_for_a_tenant(client, operator, plugin, db):
    before = db_now(db)
    ends = before + timedelta(hours=2)
    response = await create(
        client, operator, tenant_id=plugin.tenant, ends_at=at(ends), reason="database migration"
    )
    assert response.status_code == 201, response.text
    window = response.json()
    assert set(window) == FIELDS
    assert window["tenant_id"] == plugin.tenant
    assert window["installation_id"] is None
    assert window["reason"] == "database migration"
    assert window["created_by"] == "user:otto"
    assert window["active"] is True
    assert parse(window["ends_at"]) == ends
    assert before <= parse(window["starts_at"]) <= db_now(db)  # starts now by default
    assert window_rows(db) == [
        (
            window["id"],
            plugin.tenant,
            None,
            parse(window["starts_at"]),
            ends,
            "database migration",
            "user:otto",
        )
    ]


async def test_operator_schedules_a_window_for_an_installation(client, operator, plugin, db):
    starts = db_now(db) + timedelta(days=1)
    ends = starts + timedelta(hours=3)
    response = await create(
        client,
        operator,
        installation_id=plugin.id,
        starts_at=at(starts),
        ends_at=at(ends),
        reason="vendor upgrade",
    )
    assert response.status_code == 201, response.text
    window = response.json()
    assert (window["tenant_id"], window["installation_id"]) == (None, plugin.id)
    assert (parse(window["starts_at"]), parse(window["ends_at"])) == (starts, ends)
    assert window["active"] is False  # not started yet
    assert [row[1:5] for row in window_rows(db)] == [(None, plugin.id, starts, ends)]


async def test_snooze_is_a_window_starting_now_for_a_duration(client, operator, plugin, db):
    before = db_now(db)
    response = await create(
        client, operator, installation_id=plugin.id, duration_s=900, reason="noisy, on it"
    )
    assert response.status_code == 201, response.text
    window = response.json()
    starts, ends = parse(window["starts_at"]), parse(window["ends_at"])
    assert before <= starts <= db_now(db)
    assert ends - starts == timedelta(seconds=900)
    assert window["active"] is True


async def test_duration_counts_from_a_given_start(client, operator, plugin, db):
    starts = db_now(db) + timedelta(hours=1)
    response = await create(
        client,
        operator,
        tenant_id=plugin.tenant,
        starts_at=at(starts),
        duration_s=60,
        reason="short",
    )
    assert response.status_code == 201, response.text
    window = response.json()
    assert parse(window["starts_at"]) == starts
    assert parse(window["ends_at"]) == starts + timedelta(seconds=60)


async def test_offsets_other_than_utc_are_the_same_moment(client, operator, plugin, db):
    ends = (db_now(db) + timedelta(hours=1)).replace(microsecond=0)
    for offset in (timedelta(hours=5, minutes=30), timedelta(hours=-7)):
        value = ends.astimezone(timezone(offset)).isoformat()
        response = await create(
            client, operator, tenant_id=plugin.tenant, ends_at=value, reason="tz"
        )
        assert response.status_code == 201, response.text
        assert parse(response.json()["ends_at"]) == ends


# --- refusals ---------------------------------------------------------------------------------


async def test_every_bad_input_is_a_clear_4xx_and_writes_nothing(client, operator, plugin, db):
    now = db_now(db)
    soon = at(now + timedelta(hours=1))
    target = {"tenant_id": plugin.tenant}
    cases = [
        # (body, status, code, field, message fragment)
        (
            {"tenant_id": plugin.tenant, "installation_id": plugin.id, "ends_at": soon},
            422,
            "validation_error",
            "installation_id",
            "not both",
        ),
        ({"ends_at": soon}, 422, "validation_error", "tenant_id", "tenant_id or installation_id"),
        (
            {"tenant_id": None, "installation_id": None, "duration_s": 600},
            422,
            "validation_error",
            "tenant_id",
            "tenant_id or installation_id",
        ),
        (
            {**target, "ends_at": soon, "duration_s": 600},
            422,
            "validation_error",
            "duration_s",
            "not both",
        ),
        ({**target}, 422, "validation_error", "ends_at", "ends_at or duration_s"),
        (
            {**target, "ends_at": at(now - timedelta(minutes=1))},
            422,
            "validation_error",
            "ends_at",
            "in the past",
        ),
        (
            {
                **target,
                "starts_at": at(now - timedelta(hours=2)),
                "duration_s": 3600,
            },
            422,
            "validation_error",
            "duration_s",
            "in the past",
        ),
        (
            {
                **target,
                "starts_at": at(now + timedelta(hours=2)),
                "ends_at": at(now + timedelta(hours=1)),
            },
            422,
            "validation_error",
            "ends_at",
            "after starts_at",
        ),
        (
            {**target, "starts_at": soon, "ends_at": soon},
            422,
            "validation_error",
            "ends_at",
            "after starts_at",
        ),
        (
            {**target, "ends_at": "2099-01-01T00:00:00"},
            422,
            "validation_error",
            "ends_at",
            "timezone",
        ),
        (
            {**target, "starts_at": "2099-01-01T00:00:00", "duration_s": 600},
            422,
            "validation_error",
            "starts_at",
            "timezone",
        ),
        ({**target, "ends_at": "tomorrow"}, 422, "validation_error", "ends_at", "datetime"),
        ({**target, "duration_s": 59}, 422, "validation_error", "duration_s", "60"),
        ({**target, "duration_s": 30 * 86400 + 1}, 422, "validation_error", "duration_s", ""),
        ({**target, "duration_s": "600"}, 422, "validation_error", "duration_s", "integer"),
        ({**target, "duration_s": True}, 422, "validation_error", "duration_s", "integer"),
        ({**target, "duration_s": 600.5}, 422, "validation_error", "duration_s", "integer"),
        (
            {**target, "ends_at": at(now + timedelta(days=31))},
            422,
            "validation_error",
            "ends_at",
            "at most 30 days",
        ),
        (
            {**target, "starts_at": at(now + timedelta(days=400)), "duration_s": 600},
            422,
            "validation_error",
            "starts_at",
            "days ahead",
        ),
        (
            {**target, "starts_at": "9999-12-31T23:00:00-12:00", "duration_s": 600},
            422,
            "validation_error",
            "starts_at",
            "days ahead",
        ),
        (
            {**target, "starts_at": "0001-01-01T00:00:00+05:00", "ends_at": soon},
            422,
            "validation_error",
            "ends_at",
            "at most 30 days",
        ),
        ({**target, "duration_s": 600}, 422, "validation_error", "reason", "required"),
        ({**target, "duration_s": 600, "reason": ""}, 422, "validation_error", "reason", ""),
        ({**target, "duration_s": 600, "reason": "   "}, 422, "validation_error", "reason", ""),
        (
            {**target, "duration_s": 600, "reason": "x" * 501},
            422,
            "validation_error",
            "reason",
            "500",
        ),
        ({**target, "duration_s": 600, "reason": 5}, 422, "validation_error", "reason", ""),
        (
            {"installation_id": "not-a-uuid", "duration_s": 600},
            422,
            "validation_error",
            "installation_id",
            "UUID",
        ),
        ({**target, "duration_s": 600, "snooze": True}, 422, "validation_error", "snooze", ""),
        (
            {"tenant_id": "no-such-tenant", "duration_s": 600},
            404,
            "not_found",
            "tenant_id",
            "no such tenant: no-such-tenant",
        ),
        (
            {"installation_id": str(uuid.uuid4()), "duration_s": 600},
            404,
            "not_found",
            "installation_id",
            "no such installation",
        ),
    ]
    for body, status, code, field, fragment in cases:
        if "reason" not in body and field != "reason":
            body["reason"] = "because"
        response = await client.post(WINDOWS, json=body, headers=operator.auth)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == code, (body, error)
        assert error.get("field") == field, (body, error)
        assert fragment in error["message"], (body, error)
    not_json = await client.post(
        WINDOWS,
        content=b"{",
        headers={**operator.auth, "Content-Type": "application/json"},
    )
    assert not_json.status_code == 422
    assert not_json.json()["error"]["code"] == "invalid_json"
    # curl -d sends JSON as a form unless told otherwise: the answer says what to send.
    as_form = await client.post(
        WINDOWS,
        content=b'{"tenant_id": "t", "duration_s": 600, "reason": "x"}',
        headers={**operator.auth, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert as_form.status_code == 422
    assert as_form.json()["error"]["field"] == "body"
    assert "Content-Type: application/json" in as_form.json()["error"]["message"]
    assert window_rows(db) == []


async def test_viewer_cannot_create_or_end_windows(client, viewer, operator, plugin, db):
    response = await create(client, viewer, tenant_id=plugin.tenant, duration_s=600, reason="x")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    created = await create(client, operator, tenant_id=plugin.tenant, duration_s=600, reason="x")
    window_id = created.json()["id"]
    ended = await client.post(f"{WINDOWS}/{window_id}/end", headers=viewer.auth)
    assert ended.status_code == 403
    assert len(window_rows(db)) == 1
    assert window_rows(db)[0][5] == "x"


async def test_windows_need_a_token(client):
    assert (await client.get(WINDOWS)).status_code == 401
    assert (await client.post(WINDOWS, json={})).status_code == 401
    assert (await client.post(f"{WINDOWS}/{uuid.uuid4()}/end")).status_code == 401


# --- list -------------------------------------------------------------------------------------


async def test_list_is_newest_first_and_filters(client, viewer, operator, plugin, other_plugin, db):
    now = db_now(db)

    async def make(**body) -> str:
        response = await create(client, operator, reason="r", **body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    tenant_open = await make(tenant_id=plugin.tenant, duration_s=3600)
    install_future = await make(
        installation_id=plugin.id,
        starts_at=at(now + timedelta(days=1)),
        duration_s=3600,
    )
    other_open = await make(installation_id=other_plugin.id, duration_s=3600)
    tenant_over = await make(tenant_id=plugin.tenant, duration_s=3600)
    assert (await client.post(f"{WINDOWS}/{tenant_over}/end", headers=operator.auth)).is_success

    async def ids(**params) -> list[str]:
        response = await client.get(WINDOWS, params=params, headers=viewer.auth)
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        assert all(set(item) == FIELDS for item in items)
        return [item["id"] for item in items]

    assert await ids() == [tenant_over, other_open, install_future, tenant_open]
    assert await ids(active="true") == [other_open, tenant_open]
    assert await ids(active="false") == [tenant_over, install_future]
    # tenant=: the tenant's windows and its installations'.
    assert await ids(tenant=plugin.tenant) == [tenant_over, install_future, tenant_open]
    assert await ids(tenant=other_plugin.tenant) == [other_open]
    assert await ids(tenant="nobody") == []
    # installation=: what covers it, its own windows and its tenant's.
    assert await ids(installation=plugin.id) == [tenant_over, install_future, tenant_open]
    assert await ids(installation=plugin.id, active="true") == [tenant_open]
    assert await ids(installation=other_plugin.id) == [other_open]
    assert await ids(installation=str(uuid.uuid4())) == []
    assert await ids(limit=2) == [tenant_over, other_open]
    listed = (await client.get(WINDOWS, params={"active": "true"}, headers=viewer.auth)).json()
    assert all(item["active"] is True for item in listed["items"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"active": "maybe"}, "active"),
        ({"installation": "nope"}, "installation"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"tenant": "t" * 201}, "tenant"),
    ],
)
async def test_bad_list_parameters_are_422(client, viewer, params, field):
    response = await client.get(WINDOWS, params=params, headers=viewer.auth)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"
    assert response.json()["error"]["field"] == field


# --- end early --------------------------------------------------------------------------------


async def test_ending_an_open_window_keeps_the_row_and_says_who(client, operator, plugin, db):
    created = (
        await create(client, operator, tenant_id=plugin.tenant, duration_s=3600, reason="deploy")
    ).json()
    response = await client.post(f"{WINDOWS}/{created['id']}/end", headers=operator.auth)
    assert response.status_code == 200, response.text
    window = response.json()
    assert window["id"] == created["id"]
    assert window["active"] is False
    assert window["reason"] == "deploy (ended early by user:otto)"
    assert window["starts_at"] == created["starts_at"]
    assert parse(window["ends_at"]) < parse(created["ends_at"])
    assert parse(window["ends_at"]) <= db_now(db)
    rows = window_rows(db)
    assert len(rows) == 1
    assert rows[0][5] == "deploy (ended early by user:otto)"
    assert rows[0][6] == "user:otto"  # created_by unchanged
    assert rows[0][4] == parse(window["ends_at"])
    # Ending it again: already over.
    again = await client.post(f"{WINDOWS}/{created['id']}/end", headers=operator.auth)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    assert "already over" in again.json()["error"]["message"]
    assert window_rows(db) == rows


async def test_ending_a_window_that_has_not_started_keeps_a_tiny_record(
    client, operator, plugin, db
):
    starts = db_now(db) + timedelta(days=2)
    created = (
        await create(
            client,
            operator,
            installation_id=plugin.id,
            starts_at=at(starts),
            duration_s=3600,
            reason="planned",
        )
    ).json()
    response = await client.post(f"{WINDOWS}/{created['id']}/end", headers=operator.auth)
    assert response.status_code == 200, response.text
    window = response.json()
    starts_at, ends_at = parse(window["starts_at"]), parse(window["ends_at"])
    assert ends_at - starts_at == timedelta(microseconds=1)
    assert ends_at <= db_now(db)
    assert window["active"] is False
    assert window["reason"] == "planned (ended early by user:otto)"
    assert len(window_rows(db)) == 1


async def test_ending_a_window_written_in_sql(client, operator, plugin, db):
    window_id = db.execute(
        "INSERT INTO maintenance_windows (tenant_id, starts_at, ends_at, reason, created_by)"
        " VALUES (%s, now() + interval '10 minutes', now() + interval '1 hour', 'sql', 'alice')"
        " RETURNING id::text",
        (plugin.tenant,),
    ).fetchone()[0]
    response = await client.post(f"{WINDOWS}/{window_id}/end", headers=operator.auth)
    assert response.status_code == 200, response.text
    assert response.json()["reason"] == "sql (ended early by user:otto)"
    assert response.json()["created_by"] == "alice"


async def test_ending_an_unknown_or_past_window(client, operator, plugin, db):
    unknown = await client.post(f"{WINDOWS}/{uuid.uuid4()}/end", headers=operator.auth)
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "code": "not_found",
        "message": "no such maintenance window",
    }
    garbage = await client.post(f"{WINDOWS}/not-a-uuid/end", headers=operator.auth)
    assert garbage.status_code == 404
    past = db.execute(
        "INSERT INTO maintenance_windows (tenant_id, starts_at, ends_at, reason, created_by)"
        " VALUES (%s, now() - interval '2 hours', now() - interval '1 hour', 'old', 'alice')"
        " RETURNING id::text",
        (plugin.tenant,),
    ).fetchone()[0]
    response = await client.post(f"{WINDOWS}/{past}/end", headers=operator.auth)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert db.execute("SELECT reason FROM maintenance_windows").fetchall() == [("old",)]


# --- end to end: the window keeps detection quiet -----------------------------------------------


async def test_a_window_made_through_the_api_suppresses_detection_until_ended(
    settings, client, operator, plugin, db
):
    created = await create(
        client, operator, installation_id=plugin.id, duration_s=3600, reason="load test"
    )
    assert created.status_code == 201, created.text
    await beat(client, plugin, webhook_attempts=50, webhook_failures=40)  # 0.8 > 0.5
    assert (await tick(settings)).opened == 0
    assert db.execute("SELECT count(*) FROM plugin_incidents").fetchone() == (0,)

    ended = await client.post(f"{WINDOWS}/{created.json()['id']}/end", headers=operator.auth)
    assert ended.status_code == 200, ended.text
    await beat(client, plugin, webhook_attempts=50, webhook_failures=40)
    assert (await tick(settings)).opened == 1
    assert db.execute(
        "SELECT installation_id::text, type FROM plugin_incidents WHERE status = 'detected'"
    ).fetchall() == [(plugin.id, "webhook_fail_rate")]
    # The window is still there: the record of why the first crossing opened nothing.
    assert len(window_rows(db)) == 1


async def test_a_window_keeps_a_silent_installation_from_being_reported_missing(
    settings, client, operator, plugin, db
):
    await beat(client, plugin)
    created = await create(
        client, operator, tenant_id=plugin.tenant, duration_s=3600, reason="datacenter move"
    )
    assert created.status_code == 201, created.text

    def silent_for_an_hour() -> None:
        db.execute(
            "UPDATE merchant_plugins SET next_expected_at = now() - interval '1 hour'"
            " WHERE id = %s",
            (plugin.id,),
        )

    silent_for_an_hour()
    assert (await tick(settings)).opened == 0
    assert (await tick(settings)).opened == 0
    assert db.execute("SELECT count(*) FROM plugin_incidents").fetchone() == (0,)
    # Its deadline moved forward (at most to the window's end), off the overdue range.
    assert db.execute(
        "SELECT next_expected_at > now(), missed_since FROM merchant_plugins WHERE id = %s",
        (plugin.id,),
    ).fetchone() == (True, None)

    ended = await client.post(f"{WINDOWS}/{created.json()['id']}/end", headers=operator.auth)
    assert ended.status_code == 200, ended.text
    silent_for_an_hour()  # still silent, well after the window's end
    assert (await tick(settings)).opened == 1
    assert db.execute(
        "SELECT installation_id::text, type FROM plugin_incidents WHERE status = 'detected'"
    ).fetchall() == [(plugin.id, "heartbeat_missed")]
