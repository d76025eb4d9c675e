"""The dependency lock and its audit (`python3 tasks.py lock / setup / audit / check`).

tasks.py is what a developer and CI run first; these tests run it the same way, as a program
in a copy of the project where they change pyproject.toml or the lock, or call its audit with
a lock of their own. They need PyPI (pip downloads a small wheel, pip-audit asks PyPI's JSON
API), as `tasks.py check` itself does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import tasks

pytestmark = pytest.mark.no_services

ROOT = Path(__file__).resolve().parent.parent

# Real releases and their real PyPI hashes (wheel, sdist).
SNIFFIO_HASHES = {
    "1.3.0": (
        "eecefdce1e5bbfb7ad2eeaabf7c1eeb404d7757c379bd1f7e5cce9d8bf425384",
        "e60305c5e5d314f5389259b7f22aaa33d8f7dee49763119234af3755c55b9101",
    ),
    "1.3.1": (
        "2f6da418d1f1e0fddd844478f41680e794e6051915791a034ff65e5f100525a2",
        "f4324edc670a0f49750a81b895f35c3adb843cca46f0530f79fc1babb23789dc",
    ),
}
# Jinja2 3.1.2 has CVE-2024-22195 (GHSA-h5c8-rqwp-cp95, xmlattr XSS), fixed in 3.1.3.
JINJA2_312_LOCK = """jinja2==3.1.2 \\
    --hash=sha256:6088930bfe239f0e6710546ab9c19c9ef35e29792895fed6e6e31a023a182a61 \\
    --hash=sha256:31351a702a408a9e7595a8fc6150fc3f43bb6bf7e319770cbc0db9df9437e852
"""
JINJA2_ADVISORY = "GHSA-h5c8-rqwp-cp95"


def run_tasks(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(project / "tasks.py"), *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )


def copy_of_project(tmp_path: Path) -> Path:
    for name in ("tasks.py", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_lock_matches_pyproject_and_pins_every_release_with_hashes():
    assert tasks.lock_problems() == [], (
        "requirements.lock is stale: run `python3 tasks.py lock` and commit it"
    )
    text = (ROOT / "requirements.lock").read_text()
    pins = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[3])
    assert len(pins) == len(tasks.locked_pins(text)) > len(tasks.declared_names(tasks.PYPROJECT))
    for pin in pins:
        assert re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+", pin), pin
        assert "--hash=sha256:" in pin, f"no hash: {pin.splitlines()[0]}"
    # Universal: the platforms' own dependencies are in, under their markers.
    assert "colorama==" in text and "sys_platform == 'win32'" in text


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (
            lambda s: s.replace('"rich>=13",', '"rich>=13",\n    "definitely-not-locked>=1",'),
            "not locked: definitely-not-locked",
        ),
        (
            lambda s: s.replace('"jinja2>=3.1"', '"jinja2>=3.1.9"'),
            "the dependencies in pyproject.toml changed since requirements.lock was written",
        ),
    ],
    ids=["added dependency", "changed bound"],
)
def test_a_stale_lock_stops_the_check_before_anything_is_installed(tmp_path, edit, says):
    project = copy_of_project(tmp_path)
    pyproject = project / "pyproject.toml"
    edited = edit(pyproject.read_text())
    assert edited != pyproject.read_text()
    pyproject.write_text(edited)

    done = run_tasks(project, "check")

    assert done.returncode == 1
    assert says in done.stderr
    assert "Run `python3 tasks.py lock`" in done.stderr
    assert not (project / ".venv").exists()


def write_small_project(root: Path, sniffio: str, hashes: tuple[str, ...]) -> None:
    shutil.copy(ROOT / "tasks.py", root / "tasks.py")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "locktest"\nversion = "0"\nrequires-python = ">=3.11"\n'
        'dependencies = ["sniffio>=1.2"]\n[tool.setuptools]\npy-modules = ["locktest"]\n'
    )
    (root / "locktest.py").write_text("VALUE = 42\n")
    digest = tasks.dependency_digest(root / "pyproject.toml")
    lines = [f"{tasks.LOCK_DIGEST_PREFIX}{digest}", f"sniffio=={sniffio} \\"]
    lines += [f"    --hash=sha256:{h} \\" for h in hashes]
    lines[-1] = lines[-1].removesuffix(" \\")
    (root / "requirements.lock").write_text("\n".join(lines) + "\n")


def installed(project: Path, code: str) -> str:
    return subprocess.check_output(
        [str(project / ".venv" / "bin" / "python"), "-c", code], text=True, cwd="/"
    ).strip()


def test_setup_installs_exactly_the_locked_releases_checked_against_their_hashes(tmp_path):
    project = tmp_path
    # The 1.3.1 files' hashes under the 1.3.0 pin: pip must refuse what it downloads.
    write_small_project(project, "1.3.0", SNIFFIO_HASHES["1.3.1"])
    refused = run_tasks(project, "setup")
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stdout + refused.stderr

    # The locked release, not the newest one that pyproject's range allows (1.3.1).
    write_small_project(project, "1.3.0", SNIFFIO_HASHES["1.3.0"])
    done = run_tasks(project, "setup")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--require-hashes -r" in done.stdout
    version_of_sniffio = "import importlib.metadata as m; print(m.version('sniffio'))"
    assert installed(project, version_of_sniffio) == "1.3.0"
    # The project itself, editable, without dependencies of its own choosing.
    assert installed(project, "import locktest; print(locktest.__file__)") == str(
        project / "locktest.py"
    )

    again = run_tasks(project, "setup")
    assert again.returncode == 0
    assert "pip" not in again.stdout, "an unchanged lock is not installed again"

    write_small_project(project, "1.3.1", SNIFFIO_HASHES["1.3.1"])
    bumped = run_tasks(project, "setup")
    assert bumped.returncode == 0, bumped.stdout + bumped.stderr
    assert installed(project, version_of_sniffio) == "1.3.1"


class FakePyPI(BaseHTTPRequestHandler):
    """PyPI's project JSON (`/pypi/NAME/json`) for one project, as PyPI shapes it."""

    projects: dict[str, dict[str, object]] = {
        "jinja2": {
            "info": {"name": "Jinja2", "version": "3.1.2"},
            "vulnerabilities": [
                {
                    "id": "PYSEC-2024-0000",
                    "aliases": ["CVE-2024-22195", JINJA2_ADVISORY],
                    "fixed_in": ["3.1.3"],
                    "withdrawn": None,
                },
                {
                    "id": JINJA2_ADVISORY,
                    "aliases": ["CVE-2024-22195", "PYSEC-2024-0000"],
                    "fixed_in": ["3.1.3"],
                    "withdrawn": None,
                },
            ],
        }
    }

    def do_GET(self) -> None:
        match = re.fullmatch(r"/pypi/([^/]+)/json", self.path)
        project = self.projects.get(match.group(1)) if match else None
        body = json.dumps(project).encode()
        self.send_response(200 if project else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_pypi() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePyPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def per_release_data_served() -> bool:
    """Whether PyPI's per-release JSON, which pip-audit asks for, is served on this network."""
    try:
        with urllib.request.urlopen("https://pypi.org/pypi/sniffio/1.3.1/json", timeout=15):
            return True
    except urllib.error.HTTPError as e:
        e.close()
        return False


def test_a_known_vulnerability_fails_the_audit_naming_the_release_and_the_advisory(
    tmp_path, capsys, monkeypatch, fake_pypi
):
    # pip-audit's answer where PyPI serves per-release data; the project page where it does not.
    monkeypatch.setenv(tasks.AUDIT_PYPI_URL_VARIABLE, fake_pypi)
    lock = tmp_path / "requirements.lock"
    lock.write_text(JINJA2_312_LOCK)

    assert tasks.audit(lock) == 1

    err = capsys.readouterr().err
    assert f"jinja2 3.1.2: {JINJA2_ADVISORY}" in err or re.search(
        rf"jinja2 3\.1\.2: \S+ \(also [^)]*{JINJA2_ADVISORY}", err
    ), err
    assert "fixed in 3.1.3" in err
    assert err.count("jinja2 3.1.2:") == 1, "one advisory under its several ids is one line"
    assert "python3 tasks.py lock --upgrade-package jinja2" in err


def test_an_unreachable_vulnerability_service_fails_the_audit(tmp_path, capsys, monkeypatch):
    # Nothing listens on port 9 (discard): every HTTPS request fails to connect.
    for variable in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    # No answer cached from an earlier audit.
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    lock = tmp_path / "requirements.lock"
    lock.write_text(JINJA2_312_LOCK)

    assert tasks.audit(lock) == 1

    err = capsys.readouterr().err
    assert "the vulnerability audit could not run, so nothing was audited" in err
    assert "127.0.0.1" in err and "port=9" in err


def test_an_unreachable_fallback_fails_the_audit_too(tmp_path, capsys, monkeypatch):
    if per_release_data_served():
        pytest.skip("PyPI serves per-release data here: pip-audit needs no fallback")
    monkeypatch.setenv(tasks.AUDIT_PYPI_URL_VARIABLE, "http://127.0.0.1:9")
    lock = tmp_path / "requirements.lock"
    lock.write_text(JINJA2_312_LOCK)

    assert tasks.audit(lock) == 1

    err = capsys.readouterr().err
    assert "could not reach http://127.0.0.1:9" in err
    assert "were not audited" in err
