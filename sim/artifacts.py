"""Plugin artifacts: what a release ships, shared by the staging runner, the fleet simulator
and the tests (plugin_client reads the same format).

An artifact is a `.tar.gz` (a `.zip` is accepted too) of an xcore plugin folder:

    plugin.yaml      name, version, entry_point ("src.main:Plugin"), optional simulated: true
    src/__init__.py
    src/main.py      the entry point's module

either at the archive root or inside one single top-level folder.

`build_plugin_artifact` writes one deterministically (same inputs, same sha256: a release's
bytes never change). `unpack_artifact` extracts one without trusting it: no absolute paths,
no `..`, no links leaving the folder or paths going through a link, no device files, and
bounded in member count and unpacked size (an archive is small; a gzip bomb is not)."""

from __future__ import annotations

import gzip
import io
import posixpath
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

MANIFEST = "plugin.yaml"
DEFAULT_ENTRY_POINT = "src.main:Plugin"
MAX_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024
# 1980-01-01, the earliest time a zip can record: one fixed time for every member of both
# formats, so a rebuild is byte-identical.
FIXED_MTIME = 315_532_800
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_ENTRY_POINT = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

DEFAULT_SOURCE = '''"""{name} {version}: a minimal xcore plugin."""


class Plugin:
    name = "{name}"
    version = "{version}"

    def selfheal_smoke(self) -> bool:
        return True
'''


class ArtifactError(Exception):
    """The artifact cannot be used; the message says why, for a staging report."""


class UnsafeArtifact(ArtifactError):
    """Unpacking refused: the archive is malformed, too big, or tries to leave its folder."""


class ManifestError(ArtifactError):
    """plugin.yaml is missing or does not describe a plugin."""


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    entry_point: str
    simulated: bool


# --- building --------------------------------------------------------------------------------


def manifest_text(*, name: str, version: str, simulated: bool = False) -> str:
    fields: dict[str, Any] = {"name": name, "version": version, "entry_point": DEFAULT_ENTRY_POINT}
    if simulated:
        fields["simulated"] = True
    text: str = yaml.safe_dump(fields, sort_keys=False)
    return text


def build_plugin_artifact(
    dest: Path,
    *,
    name: str,
    version: str,
    source: str | None = None,
    simulated: bool = False,
) -> Path:
    """Write a plugin artifact and return its path.

    `dest` is the archive to write, or an existing directory (then `<name>-<version>.tar.gz`
    inside it). A name ending in `.zip` gives a zip, anything else a tar.gz. The files sit in
    one top-level folder named after the plugin. `source` is the text of src/main.py (a
    minimal `Plugin` class whose `selfheal_smoke()` returns True when None)."""
    for label, value in (("name", name), ("version", version)):
        if not _SAFE_NAME.fullmatch(value) or value in {".", ".."}:
            raise ValueError(f"plugin {label} {value!r} is not a safe file name")
    target = dest / f"{name}-{version}.tar.gz" if dest.is_dir() else dest
    text = DEFAULT_SOURCE.format(name=name, version=version) if source is None else source
    files = {
        f"{name}/{MANIFEST}": manifest_text(name=name, version=version, simulated=simulated),
        f"{name}/src/__init__.py": "",
        f"{name}/src/main.py": text,
    }
    folders = [f"{name}/", f"{name}/src/"]
    data = _zip_bytes(folders, files) if target.suffix == ".zip" else _tar_gz_bytes(folders, files)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def _tar_gz_bytes(folders: list[str], files: dict[str, str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in folders:
            info = _tar_info(folder.rstrip("/"), tarfile.DIRTYPE, 0o755)
            tar.addfile(info)
        for path, content in sorted(files.items()):
            body = content.encode()
            info = _tar_info(path, tarfile.REGTYPE, 0o644)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    packed = io.BytesIO()
    # filename="" and a fixed mtime: the gzip header is the same on every build.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=FIXED_MTIME) as out:
        out.write(raw.getvalue())
    return packed.getvalue()


def _tar_info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.mode = mode
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _zip_bytes(folders: list[str], files: dict[str, str]) -> bytes:
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for folder in folders:
            info = zipfile.ZipInfo(folder, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFDIR | 0o755) << 16
            archive.writestr(info, b"")
        for path, content in sorted(files.items()):
            info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content.encode())
    return packed.getvalue()


# --- unpacking -------------------------------------------------------------------------------


def unpack_artifact(
    archive: Path,
    into: Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_UNPACKED_BYTES,
) -> Path:
    """Extract `archive` (tar, tar.gz/bz2/xz or zip, told apart by content, not by name) into
    the folder `into` and return the plugin root, the folder holding plugin.yaml.

    Every member is checked before anything is written; raises UnsafeArtifact (nothing
    usable, `into` may hold a partial extraction) or ManifestError (no plugin.yaml where it
    belongs)."""
    into.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _unpack_zip(archive, into, max_members, max_bytes)
    else:
        try:
            tar = tarfile.open(archive, mode="r:*")
        except (tarfile.TarError, EOFError, OSError) as error:
            raise UnsafeArtifact(f"not a tar.gz or zip archive ({error})") from None
        with tar:
            _unpack_tar(tar, into, max_members, max_bytes)
    return plugin_root(into)


def plugin_root(folder: Path) -> Path:
    """The folder holding plugin.yaml: `folder` itself or its single top-level subfolder."""
    if (folder / MANIFEST).is_file():
        return folder
    entries = [entry for entry in folder.iterdir() if entry.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        if (entries[0] / MANIFEST).is_file():
            return entries[0]
    raise ManifestError(
        f"no {MANIFEST} at the archive root or in its single top-level folder"
        f" (found: {', '.join(sorted(e.name for e in entries)[:10]) or 'nothing'})"
    )


def _member_path(name: str) -> str:
    """The member's normalized relative path; raises UnsafeArtifact for absolute paths, `..`,
    NUL bytes and backslashes (a Windows separator that means something else here)."""
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeArtifact(f"refused member {name!r}: not a plain relative path")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise UnsafeArtifact(f"refused member {name!r}: absolute path")
    parts = [part for part in name.split("/") if part not in {"", "."}]
    if ".." in parts:
        raise UnsafeArtifact(f"refused member {name!r}: path traversal ('..')")
    return "/".join(parts)


def _check_through_links(path: str, links: set[str]) -> None:
    parts = path.split("/")
    for end in range(1, len(parts)):
        if "/".join(parts[:end]) in links:
            raise UnsafeArtifact(f"refused member {path!r}: its path goes through a link")


def _unpack_tar(tar: tarfile.TarFile, into: Path, max_members: int, max_bytes: int) -> None:
    members: list[tarfile.TarInfo] = []
    links: set[str] = set()
    total = 0
    try:
        for member in tar:
            if len(members) >= max_members:
                raise UnsafeArtifact(f"more than {max_members} members")
            path = _member_path(member.name)
            _check_through_links(path, links)
            if member.issym() or member.islnk():
                _check_link(path, member.linkname, hard=member.islnk())
                links.add(path)
            elif not (member.isfile() or member.isdir()):
                raise UnsafeArtifact(
                    f"refused member {member.name!r}: device, fifo or other special file"
                )
            total += member.size if member.isfile() else 0
            if total > max_bytes:
                raise UnsafeArtifact(f"unpacks to more than {max_bytes} bytes")
            if path:
                member.name = path
                members.append(member)
        # The "data" filter checks again while writing, with the links already on disk
        # resolved: a second, independent guard.
        tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise UnsafeArtifact(f"cannot unpack the tar archive ({error})") from None


def _check_link(path: str, target: str, *, hard: bool) -> None:
    kind = "hard link" if hard else "symlink"
    if not target or target.startswith("/") or "\\" in target or re.match(r"[A-Za-z]:", target):
        raise UnsafeArtifact(f"refused {kind} {path!r} -> {target!r}: absolute target")
    # A hard link names another member (from the archive root); a symlink is relative to
    # the folder it sits in.
    resolved = posixpath.normpath(
        target if hard else posixpath.join(posixpath.dirname(path), target)
    )
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArtifact(f"refused {kind} {path!r} -> {target!r}: leaves the folder")


def _unpack_zip(archive: Path, into: Path, max_members: int, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            infos = zipped.infolist()
            if len(infos) > max_members:
                raise UnsafeArtifact(f"more than {max_members} members")
            planned: list[tuple[zipfile.ZipInfo, str]] = []
            for info in infos:
                path = _member_path(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind == stat.S_IFLNK:
                    raise UnsafeArtifact(f"refused member {info.filename!r}: a link in a zip")
                if kind not in {0, stat.S_IFREG, stat.S_IFDIR}:
                    raise UnsafeArtifact(
                        f"refused member {info.filename!r}: device, fifo or other special file"
                    )
                if path:
                    planned.append((info, path))
            written = 0
            for info, path in planned:
                target = into / path
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(info) as source, target.open("wb") as out:
                    # Counted as written, not as declared: a zip header can lie.
                    written = _copy_bounded(source, out, written, max_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as error:
        raise UnsafeArtifact(f"cannot unpack the zip archive ({error})") from None


def _copy_bounded(source: IO[bytes], out: IO[bytes], written: int, max_bytes: int) -> int:
    while chunk := source.read(1024 * 1024):
        written += len(chunk)
        if written > max_bytes:
            raise UnsafeArtifact(f"unpacks to more than {max_bytes} bytes")
        out.write(chunk)
    return written


# --- the manifest ----------------------------------------------------------------------------


def read_manifest(root: Path) -> Manifest:
    """Parse `root`/plugin.yaml (safe YAML only); raises ManifestError saying what is wrong."""
    path = root / MANIFEST
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise ManifestError(f"cannot read {MANIFEST}: {error}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        fields = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ManifestError(f"{MANIFEST} is not valid YAML: {error}") from None
    if not isinstance(fields, dict):
        raise ManifestError(f"{MANIFEST} is not a mapping")
    values: dict[str, str] = {}
    for key in ("name", "version", "entry_point"):
        value = fields.get(key)
        # YAML reads `version: 1.2` as a number; a plain scalar is still meant as text.
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(f"{MANIFEST} has no {key}")
        values[key] = value.strip()
    if not _ENTRY_POINT.fullmatch(values["entry_point"]):
        raise ManifestError(
            f"{MANIFEST} entry_point {values['entry_point']!r} is not 'module.path:Class'"
        )
    simulated = fields.get("simulated", False)
    if not isinstance(simulated, bool):
        raise ManifestError(f"{MANIFEST} simulated must be true or false, not {simulated!r}")
    return Manifest(values["name"], values["version"], values["entry_point"], simulated)
