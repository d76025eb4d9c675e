"""The API fuzzed from its OpenAPI document (schemathesis), a short deterministic pass for CI:
a real `selfheal api` process, valid bearer tokens and plugin signatures, positive and negative
cases of every operation; no answer is a 5xx and every answer is what the document says
(status, content type, headers, body). bench/fuzz.py runs the 10,000-case pass
(SELFHEAL_FUZZ_CASES)."""

from __future__ import annotations

import os

import pytest

from tests.support.fuzz import FUZZ_ENV, Fuzzer, FuzzResult, api_process
from tests.support.ports import free_port

# bench/fuzz.py sets these for the long pass; CI's pass is a few hundred cases.
CASES = int(os.environ.get("SELFHEAL_FUZZ_CASES", "400"))
PER_OPERATION = int(os.environ.get("SELFHEAL_FUZZ_PER_OPERATION", "15"))


def progress(result: FuzzResult) -> None:
    print(
        f"fuzz: {result.cases} cases, {len(result.server_errors)} server errors, "
        f"{len(result.violations)} schema violations",
        flush=True,
    )


@pytest.mark.timeout(max(120, CASES // 5))
async def test_fuzzed_requests_get_documented_answers_and_no_server_error(settings, plugin, admin):
    settings = settings.model_copy(update={"port": free_port()})
    with api_process(settings, FUZZ_ENV) as url:
        fuzzer = Fuzzer(url, plugin, admin.token)
        result = fuzzer.until(CASES, PER_OPERATION, progress=progress)
    print(result.summary())
    assert result.cases >= CASES
    assert not result.server_errors, result.summary()
    assert not result.violations, result.summary()


# What the fuzzing found, each pinned by one request (the short pass above may not draw it).


async def test_a_nul_character_in_a_filter_is_a_422_not_a_500(client, admin):
    for path in (
        "/api/ops/maintenance-windows?tenant=a%00b",
        "/api/ops/autopatch-attempts?plugin=a%00b",
        "/api/ops/plugin-incidents?plugin=a%00b",
    ):
        response = await client.get(path, headers=admin.auth)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["code"] == "validation_error"


async def test_a_json_body_that_is_not_utf8_is_invalid_json_not_a_bare_400(client, admin):
    response = await client.put(
        "/api/ops/policy",
        content=b"0\xffm\xfeo",
        headers=admin.auth | {"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_json"
