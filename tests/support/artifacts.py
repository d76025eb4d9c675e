"""Signed releases and plugin archives as a plugin_client receives them: a release manager's
Ed25519 key signing statements the way `selfheal release add` does, and archive builders (tar,
zip, a FolderUpdater's release folder)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PLUGIN = "erp_crm"
FAR_FUTURE = "2099-01-01T00:00:00Z"


def canonical(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ReleaseSigner:
    """A release manager's key: signs statements the way `selfheal release add` does."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    @property
    def public_b64(self) -> str:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()

    def sign(self, statement: str) -> str:
        return base64.b64encode(self.key.sign(statement.encode())).decode()

    def payload(
        self,
        data: bytes,
        *,
        version: str,
        artifact_url: str,
        plugin: str = PLUGIN,
        expires_at: str = FAR_FUTURE,
    ) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        statement = canonical(
            {
                "v": 1,
                "plugin": plugin,
                "version": version,
                "sha256": sha256,
                "expires_at": expires_at,
            }
        )
        return {
            "version": version,
            "artifact_url": artifact_url,
            "sha256": sha256,
            "signature": self.sign(statement),
            "signed": statement,
        }


# -- archives ------------------------------------------------------------------------------


def plugin_files(version: str, *, marker: str = "") -> dict[str, bytes]:
    return {
        "plugin.yaml": (
            f'name: "{PLUGIN}"\nversion: "{version}"\nentry_point: "src.main:Plugin"\n'
        ).encode(),
        "src/main.py": f"VERSION = {version!r}\nMARKER = {marker!r}\n".encode(),
    }


def tar_gz(files: dict[str, bytes], *, top: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info in members:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def release_folder(root: Path, version: str) -> Path:
    """A FolderUpdater root holding `version` as current (what an installer leaves)."""
    folder = root / "versions" / version
    for name, data in plugin_files(version).items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "current").symlink_to(f"versions/{version}")
    return folder
