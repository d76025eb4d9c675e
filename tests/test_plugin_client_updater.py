"""FolderUpdater (xcore-style hosts): atomic switches of `current`, restore when the reload or
the health check fails, rollbacks to held versions, pruning, and archives that try to write
outside their folder."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin_client import Agent, FolderUpdater, UnsafeArchive, UpdateFailed
from plugin_client.archive import unpack
from tests.support.artifacts import (
    PLUGIN,
    ReleaseSigner,
    plugin_files,
    release_folder,
    tar_gz,
    tar_with,
    zip_bytes,
)
from tests.support.fakes import FakeControlPlane, agent_options, command, running

pytestmark = pytest.mark.no_services


@pytest.fixture
def cp() -> Iterator[FakeControlPlane]:
    with running(FakeControlPlane()) as plane:
        yield plane


@pytest.fixture
def signer() -> ReleaseSigner:
    return ReleaseSigner()


class Host:
    """What an xcore host does on reload: read the version `current` points to now."""

    def __init__(self, root: Path, healthy: Callable[[str], bool] = lambda version: True) -> None:
        self.root = root
        self.healthy = healthy
        self.loaded: list[str] = []

    def reload(self) -> None:
        manifest = (self.root / "current" / "plugin.yaml").read_text()
        self.loaded.append(manifest.split('version: "')[1].split('"')[0])

    def health_check(self) -> bool:
        return self.healthy(self.loaded[-1])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins" / PLUGIN
    release_folder(folder, "1.2.2")
    return folder


@pytest.fixture
def make_agent(
    cp: FakeControlPlane, signer: ReleaseSigner, tmp_path: Path
) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(**overrides: Any) -> Agent:
        options = agent_options(cp, signer, tmp_path, **overrides)
        agent = Agent(**options)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


def release(
    cp: FakeControlPlane, signer: ReleaseSigner, version: str, data: bytes
) -> dict[str, Any]:
    cp.artifacts[(PLUGIN, version)] = data
    url = f"{cp.url}/api/plugins/releases/{PLUGIN}/{version}/artifact"
    return command("update", signer.payload(data, version=version, artifact_url=url))


def current(root: Path) -> str:
    return os.readlink(root / "current")


# --------------------------------------------------------------------------- through the agent


def test_good_update_switches_current(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent], root: Path
) -> None:
    host = Host(root)
    agent = make_agent()
    agent.use(FolderUpdater(root, health_check=host.health_check, reload=host.reload))
    cmd = release(cp, signer, "1.2.3", tar_gz(plugin_files("1.2.3"), top="erp_crm-1.2.3"))
    cp.queue(cmd)
    agent.beat()
    assert current(root) == "versions/1.2.3"
    # The single top-level directory of the archive was unwrapped.
    assert sorted(p.name for p in (root / "versions" / "1.2.3").iterdir()) == ["plugin.yaml", "src"]
    assert host.loaded == ["1.2.3"]
    assert cp.reports_for(cmd["id"], "ack")[0].body["result"]["version"] == "1.2.3"
    assert agent.version == "1.2.3"
    assert not [p for p in (root / "versions").iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("how", ["returns False", "raises"])
def test_failing_health_hook_restores_the_previous_version(
    cp: FakeControlPlane,
    signer: ReleaseSigner,
    make_agent: Callable[..., Agent],
    root: Path,
    how: str,
) -> None:
    def healthy(version: str) -> bool:
        if version == "1.2.3" and how == "raises":
            raise ConnectionError("the plugin's database check timed out")
        return version != "1.2.3"

    host = Host(root, healthy)
    agent = make_agent()
    agent.use(FolderUpdater(root, health_check=host.health_check, reload=host.reload))
    cmd = release(cp, signer, "1.2.3", tar_gz(plugin_files("1.2.3")))
    cp.queue(cmd)
    agent.beat()
    assert current(root) == "versions/1.2.2"
    assert host.loaded == ["1.2.3", "1.2.2"]  # loaded, found sick, the old one loaded again
    reason = cp.fail_reason(cmd["id"])
    assert "1.2.3" in reason and "restored 1.2.2" in reason
    assert ("health check failed" in reason) if how == "returns False" else ("timed out" in reason)
    assert agent.version == "1.2.2"
    agent.beat()
    assert cp.accepted()[-1]["plugin_version"] == "1.2.2"


def test_failing_reload_restores_the_previous_version(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent], root: Path
) -> None:
    reloads: list[str] = []

    def reload() -> None:
        reloads.append(current(root))
        if current(root).endswith("1.2.3"):
            raise ImportError("src.main has no attribute Plugin")

    agent = make_agent()
    agent.use(FolderUpdater(root, reload=reload))
    cmd = release(cp, signer, "1.2.3", tar_gz(plugin_files("1.2.3")))
    cp.queue(cmd)
    agent.beat()
    assert current(root) == "versions/1.2.2"
    assert reloads == ["versions/1.2.3", "versions/1.2.2"]
    assert "has no attribute Plugin" in cp.fail_reason(cmd["id"])


def test_rollback_to_a_held_version(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent], root: Path
) -> None:
    host = Host(root)
    agent = make_agent()
    agent.use(FolderUpdater(root, health_check=host.health_check, reload=host.reload))
    cp.queue(release(cp, signer, "1.2.3", zip_bytes(plugin_files("1.2.3"))))  # a zip this time
    agent.beat()
    assert current(root) == "versions/1.2.3"
    rollback = command("rollback", {"version": "1.2.2"})
    cp.queue(rollback)
    agent.beat()
    assert current(root) == "versions/1.2.2"
    assert host.loaded == ["1.2.3", "1.2.2"]
    assert cp.reports_for(rollback["id"], "ack")[0].body == {"result": {"version": "1.2.2"}}
    assert agent.version == "1.2.2"


def test_rollback_to_a_version_whose_folder_is_gone_is_refused(
    cp: FakeControlPlane, signer: ReleaseSigner, make_agent: Callable[..., Agent], root: Path
) -> None:
    host = Host(root)
    agent = make_agent()
    agent.use(FolderUpdater(root, health_check=host.health_check, reload=host.reload))
    cp.queue(release(cp, signer, "1.2.3", tar_gz(plugin_files("1.2.3"))))
    agent.beat()
    for path in sorted((root / "versions" / "1.2.2").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "versions" / "1.2.2").rmdir()
    rollback = command("rollback", {"version": "1.2.2"})
    cp.queue(rollback)
    agent.beat()
    assert "no longer holds" in cp.fail_reason(rollback["id"])
    assert host.loaded == ["1.2.3"]


def test_archive_with_path_traversal_fails_the_update_and_writes_nothing_outside(
    cp: FakeControlPlane,
    signer: ReleaseSigner,
    make_agent: Callable[..., Agent],
    root: Path,
    tmp_path: Path,
) -> None:
    host = Host(root)
    agent = make_agent()
    agent.use(FolderUpdater(root, health_check=host.health_check, reload=host.reload))
    evil = tarfile.TarInfo("../../../escaped.txt")
    cmd = release(cp, signer, "1.2.3", tar_with([evil]))
    cp.queue(cmd)
    agent.beat()
    assert "'..'" in cp.fail_reason(cmd["id"])
    assert current(root) == "versions/1.2.2"
    assert host.loaded == []
    assert not list(tmp_path.rglob("escaped.txt"))
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["1.2.2"]


# --------------------------------------------------------------------------- archives


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


def zip_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        info = zipfile.ZipInfo("src/passwd")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(info, "/etc/passwd")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("archive", "expected"),
    [
        (lambda: tar_with([tarfile.TarInfo("../evil.py")]), "'..'"),
        (lambda: tar_with([tarfile.TarInfo("src/../../evil.py")]), "'..'"),
        (lambda: tar_with([tarfile.TarInfo("/etc/cron.d/evil")]), "absolute path"),
        (lambda: tar_with([_symlink("src/passwd", "/etc/passwd")]), "links outside"),
        (lambda: tar_with([_symlink("src/up", "../../..")]), "links outside"),
        (lambda: tar_with([_hardlink("src/shadow", "/etc/shadow")]), "absolute path"),
        (lambda: tar_with([_hardlink("src/x", "not/in/archive")]), "hard link"),
        (lambda: tar_with([_device("src/null")]), "device file"),
        (
            lambda: tar_with([_symlink("lib", "src"), tarfile.TarInfo("lib/x.py")]),
            "through the link",
        ),
        (lambda: zip_bytes({"../evil.py": b"x"}), "'..'"),
        (lambda: zip_bytes({"/abs/evil.py": b"x"}), "absolute path"),
        (zip_with_symlink, "link or special file"),
        (lambda: b"this is not an archive at all", "neither a zip nor a tar"),
    ],
)
def test_unsafe_archives_are_refused(
    tmp_path: Path, archive: Callable[[], bytes], expected: str
) -> None:
    artifact = tmp_path / "artifact"
    artifact.write_bytes(archive())
    target = tmp_path / "out" / "unpacked"
    target.parent.mkdir()
    with pytest.raises(UnsafeArchive, match=expected.replace("(", r"\(")):
        unpack(artifact, target)
    assert not (tmp_path / "evil.py").exists()


def test_archive_bomb_is_refused(tmp_path: Path) -> None:
    artifact = tmp_path / "bomb.tgz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 5_000_000
        tar.addfile(info, io.BytesIO(bytes(5_000_000)))
    artifact.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeArchive, match="more than 1000000 bytes"):
        unpack(artifact, tmp_path / "out", max_bytes=1_000_000)


def test_links_inside_the_archive_are_kept(tmp_path: Path) -> None:
    artifact = tmp_path / "a.tgz"
    files = tar_gz(plugin_files("2.0.0"))
    buffer = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(files), mode="r:gz") as source,
        tarfile.open(fileobj=buffer, mode="w:gz") as tar,
    ):
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member))
        tar.addfile(_symlink("src/entry.py", "main.py"))
    artifact.write_bytes(buffer.getvalue())
    unpack(artifact, tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "src" / "entry.py") == "main.py"
    assert (tmp_path / "out" / "src" / "entry.py").read_text().startswith("VERSION")


# --------------------------------------------------------------------------- bookkeeping


def test_keeps_the_last_versions_but_never_current_or_previous(tmp_path: Path) -> None:
    root = tmp_path / "plugin"
    release_folder(root, "1.0.0")
    updater = FolderUpdater(root, keep=3)
    for version in ("1.1.0", "1.2.0", "1.3.0", "1.4.0"):
        artifact = tmp_path / f"{version}.tgz"
        artifact.write_bytes(tar_gz(plugin_files(version)))
        updater.on_update(version, artifact)
    assert updater.installed_versions() == ["1.2.0", "1.3.0", "1.4.0"]
    updater.on_rollback("1.2.0")
    artifact = tmp_path / "1.5.0.tgz"
    artifact.write_bytes(tar_gz(plugin_files("1.5.0")))
    updater.on_update("1.5.0", artifact)
    # current (1.5.0) and the one it replaced (1.2.0) stay; the oldest other goes.
    assert updater.installed_versions() == ["1.2.0", "1.4.0", "1.5.0"]
    assert updater.current_version() == "1.5.0"
    assert updater.previous_version() == "1.2.0"


def test_holds_compares_the_recorded_sha256(tmp_path: Path) -> None:
    root = tmp_path / "plugin"
    release_folder(root, "1.0.0")
    updater = FolderUpdater(root)
    artifact = tmp_path / "1.1.0.tgz"
    artifact.write_bytes(tar_gz(plugin_files("1.1.0")))
    updater.on_update("1.1.0", artifact)
    sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert updater.holds("1.1.0", sha)
    assert updater.holds("1.1.0", None)
    assert not updater.holds("1.1.0", "0" * 64)
    assert updater.holds("1.0.0", "0" * 64)  # installed by hand: nothing recorded to compare
    assert not updater.holds("0.9.0", None)
    assert not updater.holds("../1.0.0", None)


def test_rollback_to_a_missing_folder_raises(tmp_path: Path) -> None:
    root = tmp_path / "plugin"
    release_folder(root, "1.0.0")
    with pytest.raises(UpdateFailed, match="not held"):
        FolderUpdater(root).on_rollback("0.9.0")
    assert current(root) == "versions/1.0.0"
