"""The OpenAPI document describes every answer: a schema for each success (a media type for
/metrics and the artifact download), the one error shape (app/core/errors.py, ErrorBody) for
each error status a route can answer, and never FastAPI's own 422 schema, which this API does
not send. The last tests check real answers against the documented models."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from app.core.errors import ErrorBody, error_body
from app.health.routes import Health
from app.main import create_app
from app.plugins.schemas import CommandAcked, CommandFailed, HeartbeatAnswer
from tests.support.plugins import queue_command, send_heartbeat
from tests.support.settings import make_settings

no_services = pytest.mark.no_services

ERROR_REF = "#/components/schemas/ErrorBody"
# The routes whose success is not JSON, and its media type.
NOT_JSON = {
    ("get", "/metrics"): "text/plain",
    ("get", "/api/plugins/releases/{plugin}/{version}/artifact"): "application/octet-stream",
}
# Every route under /api and the error statuses it documents: what it can answer (422 also
# where FastAPI would otherwise add its own schema; see error_responses).
OPS = {401, 429, 503}
PLUGINS = {401, 429, 503}
ERRORS = {
    ("get", "/api/ops/policy"): OPS,
    ("put", "/api/ops/policy"): OPS | {403, 413, 422},
    ("get", "/api/ops/plugin-incidents"): OPS | {422},
    ("get", "/api/ops/plugin-incidents/{incident_id}"): OPS | {404, 422},
    ("get", "/api/ops/kpis"): OPS | {422},
    ("get", "/api/ops/autopatch-attempts"): OPS | {422},
    ("post", "/api/ops/plugin-incidents/{incident_id}/approve"): OPS | {403, 404, 409, 413, 422},
    ("post", "/api/ops/plugin-incidents/{incident_id}/manual-action"): OPS
    | {403, 404, 409, 413, 422},
    ("post", "/api/ops/maintenance-windows"): OPS | {403, 404, 413, 422},
    ("get", "/api/ops/maintenance-windows"): OPS | {422},
    ("post", "/api/ops/maintenance-windows/{window_id}/end"): OPS | {403, 404, 409, 422},
    ("post", "/api/plugins/heartbeat"): PLUGINS | {400, 413, 422},
    ("post", "/api/plugins/commands/{command_id}/ack"): PLUGINS | {400, 404, 409, 413, 422},
    ("post", "/api/plugins/commands/{command_id}/fail"): PLUGINS | {400, 404, 409, 413, 422},
    ("get", "/api/plugins/releases/{plugin}/{version}/artifact"): PLUGINS | {403, 404, 422},
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    # Nothing connects before the lifespan starts: building the document needs no server.
    settings = make_settings("postgresql://nobody@127.0.0.1:1/none", "redis://127.0.0.1:1/0", "x:")
    return create_app(settings).openapi()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


def resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/components/schemas/"), ref
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]]


@no_services
def test_every_success_answer_has_a_schema(document):
    for method, path, operation in operations(document):
        successes = {s: r for s, r in operation["responses"].items() if s.startswith("2")}
        assert successes, (method, path)
        for status, response in successes.items():
            content = response.get("content", {})
            where = (method.upper(), path, status)
            if (method, path) in NOT_JSON:
                assert list(content) == [NOT_JSON[method, path]], where
                assert content[NOT_JSON[method, path]]["schema"]["type"] == "string", where
                continue
            assert list(content) == ["application/json"], where
            schema = content["application/json"].get("schema", {})
            # A named model (or a list of them): never the empty schema of an untyped answer.
            target = schema.get("items", schema)
            assert "$ref" in target, where
            assert resolve(document, target["$ref"])["properties"], where


@no_services
def test_every_api_route_documents_its_error_statuses_with_the_one_error_shape(document):
    api = {(m, p): op for m, p, op in operations(document) if p.startswith("/api/")}
    assert set(api) == set(ERRORS), "a route was added or removed: say which errors it answers"
    for (method, path), operation in api.items():
        errors = {
            int(status): response
            for status, response in operation["responses"].items()
            if not status.startswith("2")
        }
        assert set(errors) == ERRORS[method, path], (method.upper(), path)
        for status, response in errors.items():
            where = (method.upper(), path, status)
            assert response["description"], where
            assert response["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}
            if status in ("429", "503"):
                assert "Retry-After" in response["headers"], where


@no_services
def test_the_health_answer_is_described_for_200_and_503(document):
    responses = document["paths"]["/health"]["get"]["responses"]
    for status in ("200", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Health"}, status


@no_services
def test_no_route_refers_to_fastapis_own_validation_error_schema(document):
    text = json.dumps(document)
    assert "HTTPValidationError" not in text
    assert "#/components/schemas/ValidationError" not in text
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])


@no_services
def test_every_reference_in_the_document_resolves(document):
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        resolve(document, ref)


@no_services
def test_the_error_schema_is_what_error_body_writes(document):
    detail = resolve(document, resolve(document, ERROR_REF)["properties"]["error"]["$ref"])
    assert set(detail["required"]) == {"code", "message"}
    # `field` is absent when there is none, never null.
    assert detail["properties"]["field"]["type"] == "string"
    for body in (error_body("not_found", "no such incident"), error_body("x", "y", "a.b")):
        described(ErrorBody, json.loads(body))


def shape(value: Any) -> Any:
    """The keys of a JSON value, all the way down, without the leaves."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return None


def described(model: type[BaseModel], body: Any) -> None:
    """The body validates against the model, and the model knows every key in it."""
    parsed = model.model_validate(body)
    assert shape(parsed.model_dump(mode="json", exclude_unset=True)) == shape(body)


# --- Real answers against the documented models (these need PostgreSQL and Redis) ------------


async def test_the_health_answer_is_its_model(client):
    response = await client.get("/health")
    assert response.status_code == 200
    described(Health, response.json())


async def test_the_heartbeat_ack_and_fail_answers_are_their_models(client, settings, plugin):
    update = await queue_command(settings, plugin, type="update", payload={"version": "1.2.3"})
    config = await queue_command(settings, plugin, type="config", payload={"values": {"x": 1}})
    response = await send_heartbeat(client, plugin)
    assert response.status_code == 200, response.text
    described(HeartbeatAnswer, response.json())
    assert {c["id"] for c in response.json()["commands"]} == {update, config}
    for command_id, verb, body, model in (
        (update, "ack", b'{"result": {}}', CommandAcked),
        (config, "fail", b'{"error": "no"}', CommandFailed),
    ):
        path = f"/api/plugins/commands/{command_id}/{verb}"
        response = await client.post(path, content=body, headers=plugin.headers(body, path))
        assert response.status_code == 200, response.text
        described(model, response.json())


async def test_error_answers_are_the_error_model(client, plugin):
    for response in (
        await client.get("/api/ops/policy"),
        await client.get("/api/ops/policy", headers={"Authorization": "Bearer nope"}),
        await send_heartbeat(client, plugin, body=b"{}"),
    ):
        assert response.status_code in (401, 422), response.text
        described(ErrorBody, response.json())
