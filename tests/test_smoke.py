from tests.support.plugins import send_heartbeat


async def test_heartbeat_roundtrip(client, plugin, db):
    response = await send_heartbeat(client, plugin)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["commands"] == []
    assert body["next_heartbeat_s"] == 120
    row = db.execute("SELECT count(*) FROM plugin_heartbeats").fetchone()
    assert row == (1,)
