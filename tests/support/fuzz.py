"""The API fuzzed from its own OpenAPI document with schemathesis, as users meet it: a real
`selfheal api` process on loopback, every generated request authenticated (a bearer token of
an admin for /api/ops, an installation's HMAC signature for /api/plugins, over the exact bytes
sent), and every answer checked: no 5xx, a documented status, content type, headers and body.

tests/test_fuzz_api.py runs a short pass of it in CI; bench/fuzz.py runs 10,000 cases."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup, ServerError
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.core.settings import Settings
from app.plugins.signatures import sign
from tests.support.plugins import Plugin
from tests.support.processes import stop_process
from tests.support.settings import REPO, settings_env

OPS_PREFIX = "/api/ops/"
PLUGINS_PREFIX = "/api/plugins/"
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# The rate limits are off for the fuzzed API: thousands of requests of one installation and one
# token in a few minutes would be 429s, which say nothing about how input is handled
# (tests/test_rate_limits.py covers the limits).
FUZZ_ENV = {
    "SELFHEAL_RATE_PER_INSTALLATION": "0",
    "SELFHEAL_RATE_PER_TENANT": "0",
    "SELFHEAL_RATE_PER_OPS_TOKEN": "0",
}


class PluginSignature(requests.auth.AuthBase):
    """Signs a prepared request as the installation: the signature covers the body bytes that
    go on the wire, so it is computed after requests has serialized what schemathesis made.

    A generated request sent twice (hypothesis repeats small inputs) would be a replay, and the
    API rightly refuses replays; each request gets a distinct timestamp inside the accepted
    window so that every one is a new signed message."""

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self._offsets = itertools.cycle(range(0, 240))

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        # requests has serialized it by now: bytes or str, never a stream here.
        raw = body.encode() if isinstance(body, str) else body if isinstance(body, bytes) else b""
        # The API verifies the decoded path (request.url.path), as plugin_client signs it.
        path = unquote(urlsplit(request.url or "").path)
        stamp = str(int(time.time()) - next(self._offsets))
        request.headers["X-Plugin-Id"] = self.plugin.id
        request.headers["X-Timestamp"] = stamp
        request.headers["X-Signature"] = sign(
            self.plugin.secret, stamp, request.method or "GET", path, raw
        )
        return request


@dataclass
class FuzzResult:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        lines = [
            f"cases: {self.cases}",
            f"server errors (5xx): {len(self.server_errors)}",
            f"schema violations: {len(self.violations)}",
            f"statuses: {statuses}",
            "cases per operation:",
            *(f"  {n:6d}  {op}" for op, n in sorted(self.by_operation.items())),
        ]
        for title, found in (
            ("server errors", self.server_errors),
            ("violations", self.violations),
        ):
            if found:
                lines.append(f"--- {title} (the first 5 of {len(found)}) ---")
                lines.extend(found[:5])
        return "\n".join(lines)


@dataclass
class Fuzzer:
    """Sends the cases of one schema to `base_url` and tallies what came back."""

    base_url: str
    plugin: Plugin
    ops_token: str
    result: FuzzResult = field(default_factory=FuzzResult)

    def __post_init__(self) -> None:
        self.schema = schemathesis.openapi.from_url(f"{self.base_url}/api/openapi.json")
        self.session = requests.Session()
        self.signature = PluginSignature(self.plugin)

    def operations(self) -> list[Any]:
        operations = []
        for result in self.schema.get_all_operations():
            assert isinstance(result, Ok), f"the document has an invalid operation: {result!r}"
            operations.append(result.ok())
        return operations

    def send(self, case: Any) -> None:
        path: str = case.operation.path
        kwargs: dict[str, Any] = {"session": self.session, "timeout": 30}
        if path.startswith(OPS_PREFIX):
            kwargs["headers"] = {"Authorization": f"Bearer {self.ops_token}"}
        elif path.startswith(PLUGINS_PREFIX):
            kwargs["auth"] = self.signature
        response = case.call(base_url=self.base_url, **kwargs)
        label = f"{case.operation.method.upper()} {path}"
        self.result.cases += 1
        self.result.statuses[response.status_code] += 1
        self.result.by_operation[label] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as failures:
            text = f"{label} -> {response.status_code}\n{failures}"
            if any(isinstance(f, ServerError) for f in failures.exceptions):
                self.result.server_errors.append(text)
            else:
                self.result.violations.append(text)

    def run(self, operation: Any, mode: GenerationMode, examples: int, at_seed: int) -> None:
        """Up to `examples` cases of one operation (fewer when hypothesis runs out of distinct
        inputs), reproducible from `at_seed`. Nothing is raised on a failure: failures are
        tallied, so one bad answer does not hide the others (and hypothesis does not shrink)."""

        @seed(at_seed)
        @hypothesis_settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def cases(case: Any) -> None:
            self.send(case)

        # An operation with no input has no negative case (nothing to make invalid).
        with contextlib.suppress(Unsatisfiable):
            cases()

    def until(
        self, total: int, per_operation: int, progress: Callable[[FuzzResult], None] | None = None
    ) -> FuzzResult:
        """Rounds over every operation, positive then negative cases, each round with the next
        seed, until `total` cases were sent."""
        operations = self.operations()
        for round_seed in itertools.count():
            for operation in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    left = total - self.result.cases
                    if left <= 0:
                        return self.result
                    self.run(operation, mode, min(per_operation, left), round_seed)
            if progress is not None:
                progress(self.result)
        raise AssertionError("unreachable")


@contextlib.contextmanager
def api_process(settings: Settings, extra_env: dict[str, str]) -> Iterator[str]:
    """A real `selfheal api` on settings.port (the test's database and Redis prefix); its URL.
    Stopped with SIGTERM when the block ends."""
    env = settings_env(settings) | extra_env
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api", "--port", str(settings.port)], env=env, cwd=REPO
    )
    url = settings.api_base_url
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"selfheal api exited with {proc.returncode}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "selfheal api did not answer within 60 s"
            time.sleep(0.1)
        yield url
    finally:
        stop_process(proc, 30)
