"""The DomainError family (app/core/errors.py) and the one place each caller maps it: the API's
exception handler, the CLI's `reporting_domain_errors`, the worker's job wrapper."""

from __future__ import annotations

import logging

import httpx
import pytest
import typer
from fastapi import FastAPI

from app.cli._common import reporting_domain_errors as cli_reporting
from app.core.errors import (
    Conflict,
    DomainError,
    Invalid,
    NotFound,
    Refused,
    domain_status,
    install_error_handlers,
)
from app.policy.gate import ApprovalRefused
from app.releases.service import ReleaseConflict
from workers.main import reporting_domain_errors as worker_reporting

pytestmark = pytest.mark.no_services

KINDS = [
    (NotFound("no such incident"), 404, "not_found"),
    (Conflict("incident is resolved"), 409, "conflict"),
    (Refused("otto cannot approve his own action"), 403, "forbidden"),
    (Invalid("patch_version is required", field="patch_version"), 422, "validation_error"),
    # Subclasses answer as their kind.
    (ApprovalRefused("vera is a viewer"), 403, "forbidden"),
    (ReleaseConflict("other bytes under 1.2.3"), 409, "conflict"),
]


@pytest.mark.parametrize(("error", "status", "code"), KINDS)
async def test_the_api_answers_each_kind_with_its_status_and_the_one_error_shape(
    error, status, code
):
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.get("/boom")
    assert (answer.status_code, domain_status(error)) == (status, (status, code))
    expected = {"code": code, "message": error.message}
    if error.field is not None:
        expected["field"] = error.field
    assert answer.json() == {"error": expected}


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (Invalid("--version 'x' is not valid"), 2),
        (NotFound("no installation"), 1),
        (Conflict("user 'ana' already exists"), 1),
        (Refused("no"), 1),
    ],
)
def test_the_cli_prints_the_message_and_exits_2_for_bad_input_else_1(error, exit_code, capsys):
    with pytest.raises(typer.Exit) as exited, cli_reporting():
        raise error
    assert exited.value.exit_code == exit_code
    assert capsys.readouterr().err == f"selfheal: {error.message}\n"


async def test_a_worker_job_that_meets_one_logs_it_and_ends(caplog):
    @worker_reporting
    async def step(ctx: dict[str, object], incident_id: str) -> str:
        raise Conflict(f"incident {incident_id} is resolved")

    with caplog.at_level(logging.WARNING):
        assert await step({}, "42") == {"refused": "Conflict"}
    assert step.__name__ == "step"


async def test_a_worker_job_lets_other_errors_through():
    @worker_reporting
    async def step(ctx: dict[str, object]) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        await step({})


def test_not_found_and_invalid_stay_lookup_and_value_errors():
    # Code that caught LookupError / ValueError from the services before still does.
    assert isinstance(NotFound("x"), LookupError)
    assert isinstance(Invalid("x"), ValueError)
    assert issubclass(Refused, DomainError)
