"""plugin_client as a package: what it imports, version order, and that its signature formats
are the control plane's (release statements made by app/releases/signing.py verify here)."""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plugin_client import CommandRefused, compare_versions
from plugin_client.signing import (
    parse_public_keys,
    response_problem,
    sign_request,
    sign_response,
    verify_release,
)

pytestmark = pytest.mark.no_services

REPO = Path(__file__).resolve().parent.parent


def test_imports_nothing_from_the_server_and_only_its_two_dependencies() -> None:
    script = (
        "import sys\n"
        "import plugin_client, plugin_client.updater, plugin_client.middleware\n"
        "roots = {name.split('.')[0] for name in sys.modules}\n"
        "bad = roots & {'app', 'sim', 'workers', 'orjson', 'pydantic', 'yaml', 'starlette',"
        " 'fastapi'}\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.9.2", "1.10.0"),
        ("1.2.3-rc1", "1.2.3"),
        ("1.2.3-rc2", "1.2.3-rc10"),
        ("1.2.2", "1.2.3"),
        ("1.2", "1.2.1"),
        ("0.9", "1.0.0"),
        ("1.2.3-alpha", "1.2.3-beta"),
    ],
)
def test_version_order(older: str, newer: str) -> None:
    assert compare_versions(older, newer) == -1
    assert compare_versions(newer, older) == 1


def test_equal_versions() -> None:
    assert compare_versions("1.2.0", "1.2") == 0
    assert compare_versions("2.0.0+build.5", "2.0.0") == 0


def test_statements_signed_by_the_control_plane_verify() -> None:
    signing = pytest.importorskip("app.releases.signing")
    key = Ed25519PrivateKey.generate()
    signer = signing.Signer(key)
    sha = "ab" * 32
    expires = datetime.now(UTC) + timedelta(days=30)
    statement, signature = signing.sign_statement(
        signer, plugin="erp_crm", version="1.2.3", sha256=sha, expires_at=expires
    )
    keys = parse_public_keys([signer.public_key_b64])
    verified = verify_release(
        keys, version="1.2.3", sha256=sha, signature=signature, signed=statement, plugin="erp_crm"
    )
    assert (verified.plugin, verified.version, verified.sha256) == ("erp_crm", "1.2.3", sha)
    with pytest.raises(CommandRefused, match="another plugin"):
        verify_release(
            keys, version="1.2.3", sha256=sha, signature=signature, signed=statement, plugin="x"
        )


def test_request_signature_matches_the_control_planes() -> None:
    signatures = pytest.importorskip("app.plugins.signatures")
    headers = sign_request("s3cret", "post", "/api/plugins/heartbeat", b"{}", timestamp=1700000000)
    expected = signatures.sign("s3cret", "1700000000", "POST", "/api/plugins/heartbeat", b"{}")
    assert headers == {"X-Timestamp": "1700000000", "X-Signature": expected}


def test_response_signature() -> None:
    body = b'{"commands":[]}'
    headers = {k.lower(): v for k, v in sign_response("k", 200, "/p", body).items()}
    assert response_problem("k", 200, "/p", body, headers) is None
    assert response_problem("k", 200, "/other", body, headers) is not None
    assert response_problem("k", 201, "/p", body, headers) is not None
    assert response_problem("k", 200, "/p", body + b" ", headers) is not None
    assert response_problem("other", 200, "/p", body, headers) is not None
    rotated = {**headers, "x-signature": "v1=" + "0" * 64 + ", " + headers["x-signature"]}
    assert response_problem("k", 200, "/p", body, rotated) is None
    assert "unsigned" in (response_problem("k", 200, "/p", body, {}) or "")


def test_public_keys_must_be_raw_ed25519() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        parse_public_keys([base64.b64encode(b"short").decode()])


def test_responses_signed_by_the_control_plane_verify() -> None:
    signatures = pytest.importorskip("app.plugins.signatures")
    body = b'{"server_time":"2030-01-01T00:00:00Z","next_heartbeat_s":5,"commands":[]}'
    path = "/api/plugins/heartbeat"
    signed = signatures.response_signature(b"s3cret", 200, path, body)
    headers = {key.lower(): value for key, value in signed.items()}
    assert response_problem("s3cret", 200, path, body, headers) is None
    assert response_problem("other", 200, path, body, headers) is not None


def test_relative_artifact_paths_resolve_against_the_control_plane(tmp_path: Path) -> None:
    from plugin_client import Agent

    agent = Agent(
        "https://cp.example/base", "id", "s", plugin="erp_crm", version="1.0.0", state_dir=tmp_path
    )
    core = agent._core
    url, same_origin = core.artifact_location("/api/plugins/releases/erp_crm/1.1.0/artifact")
    assert (url, same_origin) == (
        "https://cp.example/base/api/plugins/releases/erp_crm/1.1.0/artifact",
        True,
    )
    assert core.artifact_location("https://cp.example:443/x")[1] is True
    assert core.artifact_location("http://cp.example/x")[1] is False  # another scheme
    assert core.artifact_location("https://mirror.example/x")[1] is False
    with pytest.raises(CommandRefused, match="not http"):
        core.artifact_location("//evil.example/x")
    agent.close()
