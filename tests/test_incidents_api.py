"""Ops read API: incident list (filters, keyset paging), detail with timeline, attempts, KPIs."""

from __future__ import annotations

import uuid

from tests.support.plugins import register


async def make_incidents(settings, db, count: int) -> list[str]:
    plugin = await register(settings)
    ids = []
    for i in range(count):
        ids.append(
            db.execute(
                "INSERT INTO plugin_incidents (installation_id, tenant_id, plugin_name, type,"
                " severity, status, first_bad_signal_at, detected_at)"
                " VALUES (%s, %s, 'payments', %s, %s, 'resolved',"
                "  now() - make_interval(mins => %s) - interval '30 seconds',"
                "  now() - make_interval(mins => %s)) RETURNING id::text",
                (
                    plugin.id,
                    plugin.tenant,
                    "webhook_fail_rate" if i % 2 else "error_spike",
                    "high" if i == 0 else "medium",
                    i,
                    i,
                ),
            ).fetchone()[0]
        )
    return ids  # newest first


async def test_incident_list_needs_a_token(client):
    response = await client.get("/api/ops/plugin-incidents")
    assert response.status_code == 401


async def test_incident_list_pages_newest_first_with_a_cursor(settings, client, viewer, db):
    ids = await make_incidents(settings, db, 5)
    seen, cursor = [], None
    for _ in range(3):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (
            await client.get("/api/ops/plugin-incidents", params=params, headers=viewer.auth)
        ).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    # The last page said so: a full page would have handed a cursor.
    assert cursor is None


async def test_incident_list_filters(settings, client, viewer, db):
    ids = await make_incidents(settings, db, 4)
    by_severity = (
        await client.get(
            "/api/ops/plugin-incidents", params={"severity": "high"}, headers=viewer.auth
        )
    ).json()
    assert [i["id"] for i in by_severity["items"]] == [ids[0]]
    by_type = (
        await client.get(
            "/api/ops/plugin-incidents", params={"type": "webhook_fail_rate"}, headers=viewer.auth
        )
    ).json()
    assert [i["id"] for i in by_type["items"]] == [ids[1], ids[3]]
    nobody = (
        await client.get(
            "/api/ops/plugin-incidents", params={"tenant": "nobody"}, headers=viewer.auth
        )
    ).json()
    assert nobody == {"items": [], "next_cursor": None}


async def test_bad_filters_and_cursor_are_422_naming_them(client, viewer):
    for params, field in (
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"severity": "extreme"}, "severity"),
        ({"limit": 0}, "limit"),
    ):
        response = await client.get("/api/ops/plugin-incidents", params=params, headers=viewer.auth)
        assert response.status_code == 422, params
        assert response.json()["error"]["field"] == field


async def test_incident_detail_has_attempts_and_a_timeline(settings, client, viewer, db):
    incident = (await make_incidents(settings, db, 1))[0]
    attempt = db.execute(
        "INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, from_version,"
        " to_version, decision_source, confidence)"
        " SELECT id, installation_id, '1.2.2', '1.2.3', 'sira', 0.87 FROM plugin_incidents"
        " RETURNING id::text"
    ).fetchone()[0]
    db.execute("UPDATE plugin_autopatch_attempts SET status = 'staging' WHERE id = %s", (attempt,))
    body = (await client.get(f"/api/ops/plugin-incidents/{incident}", headers=viewer.auth)).json()
    assert body["id"] == incident
    assert [a["id"] for a in body["attempts"]] == [attempt]
    assert body["attempts"][0]["confidence"] == 0.87
    events = [item["event"] for item in body["timeline"]]
    assert events[0] == "first bad signal"
    assert events[1] == "detected (error_spike)"
    assert events[2:4] == [
        f"attempt {attempt}: created -> pending",
        f"attempt {attempt}: pending -> staging",
    ]


async def test_unknown_incident_is_404(client, viewer):
    for key in (str(uuid.uuid4()), "nope"):
        response = await client.get(f"/api/ops/plugin-incidents/{key}", headers=viewer.auth)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


async def test_attempt_list_filters_by_status(settings, client, viewer, db):
    await make_incidents(settings, db, 1)
    for status in ("success", "failed"):
        db.execute(
            "INSERT INTO plugin_autopatch_attempts (incident_id, installation_id, status,"
            " executed_at) SELECT id, installation_id, %s, now() FROM plugin_incidents",
            (status,),
        )
    body = (
        await client.get(
            "/api/ops/autopatch-attempts", params={"status": "failed"}, headers=viewer.auth
        )
    ).json()
    assert [a["status"] for a in body["items"]] == ["failed"]


async def test_kpis_are_exact_and_null_safe(settings, client, viewer, db):
    empty = (await client.get("/api/ops/kpis", headers=viewer.auth)).json()
    assert (empty["attempts"], empty["success_rate"], empty["rollback_rate"]) == (0, None, None)
    await make_incidents(settings, db, 2)
    db.execute("UPDATE plugin_incidents SET resolved_at = detected_at + interval '5 minutes'")
    for status in ("success", "success", "success", "rolled_back"):
        db.execute(
            "INSERT INTO plugin_autopatch_attempts (installation_id, status, executed_at)"
            " SELECT installation_id, %s, now() FROM plugin_incidents LIMIT 1",
            (status,),
        )
    body = (await client.get("/api/ops/kpis", headers=viewer.auth)).json()
    assert body["attempts"] == 4
    assert body["success_rate"] == 75.0
    assert body["rollback_rate"] == 25.0
    assert body["mttd_s"] == 30.0
    assert body["mttr_s"] == 300.0
    assert body["incidents_by_severity_24h"] == {"high": 1, "medium": 1}


async def test_a_muted_incident_says_so_in_the_api_and_on_the_dashboard(
    settings, client, viewer, db
):
    """muted_at: the installation's heartbeats are missing, so healing leaves the incident."""
    from tests.support.dashboard import sign_in

    muted, plain = await make_incidents(settings, db, 2)
    db.execute(
        "UPDATE plugin_incidents SET status = 'detected', muted_at = now() WHERE id = %s",
        (muted,),
    )
    at = db.execute("SELECT muted_at FROM plugin_incidents WHERE id = %s", (muted,)).fetchone()[0]
    listed = (await client.get("/api/ops/plugin-incidents", headers=viewer.auth)).json()["items"]
    assert {i["id"]: i["muted_at"] is not None for i in listed} == {muted: True, plain: False}
    detail = (await client.get(f"/api/ops/plugin-incidents/{muted}", headers=viewer.auth)).json()
    assert detail["muted_at"] is not None
    assert detail["muted_at"].replace("Z", "+00:00") == at.isoformat()
    await sign_in(client, viewer)
    page = (await client.get(f"/ops/incidents/{muted}")).text
    assert "Muted since" in page and "heartbeats are missing" in page
    assert "Muted since" not in (await client.get(f"/ops/incidents/{plain}")).text
