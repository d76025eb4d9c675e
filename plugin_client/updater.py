"""FolderUpdater: updates and rollbacks for hosts that load a plugin from a folder (xcore).

    <root>/versions/<version>/      one unpacked release each (plugin.yaml, src/, ...)
    <root>/current -> versions/<v>  the version the host loads (a relative symlink)
    <root>/.selfheal-updater.json   the sha256 each version was installed from, and when

A switch replaces `current` atomically (a new link under a temporary name, then os.replace),
calls `reload()`, then `health_check()`. If either raises, or the health check returns False,
`current` goes back to where it pointed, `reload()` is called again for the old version, and
the command fails: xcore's "rollback on reload". The host never sees a half-written version:
archives are unpacked next to the others under a temporary name and renamed into place."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plugin_client._core import sha256_file
from plugin_client.archive import DEFAULT_MAX_BYTES, UnsafeArchive, unpack
from plugin_client.errors import UpdateFailed
from plugin_client.state import fsync_directory, write_atomic
from plugin_client.versions import is_valid_version, version_key

log = logging.getLogger("plugin_client")

_METADATA = ".selfheal-updater.json"


class FolderUpdater:
    """`root`: the plugin's folder (created if needed). `health_check()` returns False or
    raises when the freshly loaded version is not healthy; `reload()` makes the host load
    whatever `current` points to. Both are optional and called in the agent's thread (for
    AsyncAgent: a worker thread). `keep`: how many versions to keep (current and the one
    before it are never deleted)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        health_check: Callable[[], bool | None] | None = None,
        reload: Callable[[], object] | None = None,
        *,
        keep: int = 5,
        max_unpacked_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.current_link = self.root / "current"
        self.health_check = health_check
        self.reload = reload
        self.keep = max(keep, 2)
        self.max_unpacked_bytes = max_unpacked_bytes
        self._lock = threading.Lock()
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    # -- what is there -------------------------------------------------------------------

    def current_version(self) -> str | None:
        """The version `current` points to, or None when there is no such link."""
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        return Path(target).name

    def installed_versions(self) -> list[str]:
        """Versions present under versions/, oldest first by version number."""
        found = [
            entry.name
            for entry in self.versions_dir.iterdir()
            if entry.is_dir()
            and not entry.is_symlink()
            and is_valid_version(entry.name)
            and ".tmp-" not in entry.name
        ]
        return sorted(found, key=version_key)

    def holds(self, version: str, sha256: str | None) -> bool:
        """Whether `versions/<version>` exists and, when both sides know the sha256 of the
        artifact it came from, that they agree."""
        if not is_valid_version(version):
            return False
        folder = self.versions_dir / version
        if not folder.is_dir() or folder.is_symlink():
            return False
        recorded = self._metadata().get(version, {}).get("sha256")
        return sha256 is None or recorded is None or recorded == sha256

    # -- handlers ------------------------------------------------------------------------

    def on_update(self, version: str, artifact: Path) -> None:
        """Unpack `artifact` as versions/<version>, switch to it, reload, check health;
        restore the previous version and raise UpdateFailed if that does not work."""
        self._check_version(version)
        with self._lock:
            folder = self.versions_dir / version
            staging = self.versions_dir / f"{version}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                unpack(artifact, staging, max_bytes=self.max_unpacked_bytes)
            except Exception as exc:  # refused, or broken half way (bad gzip, truncated, disk)
                _remove_tree(staging)
                detail = (
                    str(exc) if isinstance(exc, UnsafeArchive) else f"{type(exc).__name__}: {exc}"
                )
                raise UpdateFailed(f"cannot unpack the artifact of {version}: {detail}") from None
            if folder.exists() or folder.is_symlink():
                if self.current_version() == version:
                    _remove_tree(staging)
                    raise UpdateFailed(f"version {version} is the current version already")
                # Left over by an earlier attempt that did not take: replace it.
                _remove_tree(folder)
            staging.rename(folder)
            fsync_directory(self.versions_dir)
            self._remember(version, sha256_file(artifact))
            self._switch(version)
            self._prune()

    def on_rollback(self, version: str) -> None:
        """Switch back to versions/<version> (which must exist), reload, check health."""
        self._check_version(version)
        with self._lock:
            folder = self.versions_dir / version
            if not folder.is_dir() or folder.is_symlink():
                raise UpdateFailed(f"version {version} is not held in {self.versions_dir}")
            self._switch(version)

    # -- switching -----------------------------------------------------------------------

    def _switch(self, version: str) -> None:
        previous = self._link_target()
        self._point_current_to(f"versions/{version}")
        try:
            if self.reload is not None:
                self.reload()
            healthy = self.health_check() if self.health_check is not None else True
            if healthy is False:
                raise UpdateFailed(f"health check failed after switching to {version}")
        except Exception as exc:
            self._restore(previous)
            restored = Path(previous).name if previous else "nothing"
            log.warning(
                "plugin_client: switch to %s failed, restored %s: %s", version, restored, exc
            )
            if isinstance(exc, UpdateFailed):
                raise UpdateFailed(f"{exc}; restored {restored}") from None
            raise UpdateFailed(
                f"switching to {version} failed ({type(exc).__name__}: {exc}); restored {restored}"
            ) from exc
        if previous is not None and Path(previous).name != version:
            self._save_metadata(self._metadata(), previous=Path(previous).name)
        log.info("plugin_client: %s now points to %s", self.current_link, version)

    def _restore(self, previous: str | None) -> None:
        if previous is None:
            with contextlib.suppress(FileNotFoundError):
                self.current_link.unlink()
        else:
            self._point_current_to(previous)
        if self.reload is not None:
            try:
                self.reload()
            except Exception:
                log.exception("plugin_client: reload after restoring %s failed", previous)

    def _link_target(self) -> str | None:
        try:
            return os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UpdateFailed(f"{self.current_link} exists and is not a symlink") from exc

    def _point_current_to(self, target: str) -> None:
        temporary = self.root / f".current.tmp-{uuid.uuid4().hex[:12]}"
        os.symlink(target, temporary)
        try:
            os.replace(temporary, self.current_link)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        fsync_directory(self.root)

    # -- bookkeeping ---------------------------------------------------------------------

    def _read_metadata(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / _METADATA).read_bytes())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _metadata(self) -> dict[str, dict[str, Any]]:
        versions = self._read_metadata().get("versions")
        return versions if isinstance(versions, dict) else {}

    def previous_version(self) -> str | None:
        """The version `current` pointed to before the last successful switch."""
        previous = self._read_metadata().get("previous")
        return previous if isinstance(previous, str) else None

    def _remember(self, version: str, sha256: str) -> None:
        versions = self._metadata()
        versions[version] = {"sha256": sha256, "installed_at": time.time()}
        self._save_metadata(versions)

    def _save_metadata(
        self, versions: dict[str, dict[str, Any]], *, previous: str | None = None
    ) -> None:
        data = {"versions": versions, "previous": previous or self.previous_version()}
        payload = json.dumps(data, sort_keys=True, indent=1).encode()
        write_atomic(self.root / _METADATA, payload)

    def _prune(self) -> None:
        """Keep the `keep` most recently installed versions, and always the current one and
        the one it replaced (folders this updater did not install count as oldest)."""
        metadata = self._metadata()
        protected = {self.current_version(), self.previous_version()}
        installed = self.installed_versions()
        ranked = sorted(
            installed,
            key=lambda v: (float(metadata.get(v, {}).get("installed_at", 0.0)), version_key(v)),
        )
        excess = len(ranked) - self.keep
        for version in ranked:
            if excess <= 0:
                break
            if version in protected:
                continue
            _remove_tree(self.versions_dir / version)
            metadata.pop(version, None)
            excess -= 1
        # Leftovers of interrupted unpacks.
        for entry in self.versions_dir.iterdir():
            if ".tmp-" in entry.name and entry.is_dir():
                _remove_tree(entry)
        self._save_metadata(metadata)

    @staticmethod
    def _check_version(version: str) -> None:
        if not is_valid_version(version):
            raise UpdateFailed(f"{version!r} is not a version that can name a folder")


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
