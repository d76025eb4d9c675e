"""Unpacking release artifacts (tar.gz / .tgz / .tar / .zip, recognised by content) without
letting them write outside the target folder.

Refused, before anything is written: absolute paths, `..` components, links that point
outside the archive, hard links to anything outside it, device files and FIFOs, and archives
that unpack to more than `max_bytes` or more than `max_members` entries (decompression bombs).
If everything sits under one top-level directory, its content becomes the folder."""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
DEFAULT_MAX_MEMBERS = 20_000


class UnsafeArchive(Exception):
    """The artifact cannot be unpacked safely (or is not an archive); the message says why."""


def _clean_name(name: str) -> str:
    """The member's path, normalised; UnsafeArchive when it could escape the folder."""
    if "\x00" in name:
        raise UnsafeArchive(f"archive member {name!r} has a NUL byte in its name")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UnsafeArchive(f"archive member {name!r} has an absolute path")
    parts = [part for part in unified.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive member {name!r} has a '..' path component")
    return "/".join(parts)


def _inside(link_dir: str, target: str) -> bool:
    """Whether a relative link `target` placed in `link_dir` stays within the archive root."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return False
    resolved = posixpath.normpath(posixpath.join(link_dir, target.replace("\\", "/")))
    return resolved != ".." and not resolved.startswith("../")


def unpack(
    archive: Path,
    destination: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> None:
    """Unpack `archive` into `destination` (created; must not exist)."""
    destination.mkdir(parents=False, exist_ok=False)
    if zipfile.is_zipfile(archive):
        _unpack_zip(archive, destination, max_bytes, max_members)
    else:
        try:
            tar = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError) as exc:
            raise UnsafeArchive(f"artifact is neither a zip nor a tar archive: {exc}") from None
        with tar:
            _unpack_tar(tar, destination, max_bytes, max_members)
    _hoist_single_directory(destination)


def _unpack_tar(tar: tarfile.TarFile, destination: Path, max_bytes: int, max_members: int) -> None:
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnsafeArchive(f"unreadable tar archive: {exc}") from None
    if len(members) > max_members:
        raise UnsafeArchive(f"archive has more than {max_members} entries")
    total = 0
    names: set[str] = set()
    for member in members:
        name = _clean_name(member.name)
        if member.isdev() or member.isfifo():
            raise UnsafeArchive(f"archive member {member.name!r} is a device file or FIFO")
        if member.issym():
            if not _inside(posixpath.dirname(name), member.linkname):
                raise UnsafeArchive(
                    f"archive member {member.name!r} links outside the archive"
                    f" ({member.linkname!r})"
                )
        elif member.islnk():
            link_target = _clean_name(member.linkname)
            if link_target not in names:
                raise UnsafeArchive(
                    f"archive member {member.name!r} is a hard link to {member.linkname!r},"
                    " which is not an earlier file of the archive"
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchive(f"archive member {member.name!r} has an unsupported type")
        total += max(member.size, 0)
        if total > max_bytes:
            raise UnsafeArchive(f"archive unpacks to more than {max_bytes} bytes")
        names.add(name)
    for member in members:
        name = _clean_name(member.name)
        if not name:
            continue
        target = destination / name
        _check_parent(destination, target)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
        elif member.issym():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(member.linkname, target)
        elif member.islnk():
            target.parent.mkdir(parents=True, exist_ok=True)
            source = destination / _clean_name(member.linkname)
            _check_parent(destination, source)
            shutil.copy2(source, target, follow_symlinks=False)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            source_stream = tar.extractfile(member)
            if source_stream is None:
                raise UnsafeArchive(f"archive member {member.name!r} cannot be read")
            with source_stream, _create(target, member.mode) as out:
                shutil.copyfileobj(source_stream, out)


def _unpack_zip(archive: Path, destination: Path, max_bytes: int, max_members: int) -> None:
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeArchive(f"unreadable zip archive: {exc}") from None
    with bundle:
        infos = bundle.infolist()
        if len(infos) > max_members:
            raise UnsafeArchive(f"archive has more than {max_members} entries")
        total = 0
        for info in infos:
            _clean_name(info.filename)
            # Unix type bits, when the archiver set them (zip tools often leave them out).
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchive(
                    f"archive member {info.filename!r} is a link or special file"
                    " (not supported in zip artifacts)"
                )
            total += info.file_size
            if total > max_bytes:
                raise UnsafeArchive(f"archive unpacks to more than {max_bytes} bytes")
        written = 0
        for info in infos:
            name = _clean_name(info.filename)
            if not name:
                continue
            target = destination / name
            _check_parent(destination, target)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            mode = (info.external_attr >> 16) & 0o777
            with bundle.open(info) as source, _create(target, mode or 0o644) as out:
                # Declared sizes can lie: count what actually comes out.
                while chunk := source.read(1024 * 1024):
                    written += len(chunk)
                    if written > max_bytes:
                        raise UnsafeArchive(f"archive unpacks to more than {max_bytes} bytes")
                    out.write(chunk)


def _create(path: Path, mode: int) -> contextlib.closing[io.FileIO]:
    """A new regular file (never through an existing link), with sane permissions."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, (mode & 0o755) | 0o600)
    return contextlib.closing(io.FileIO(fd, "wb"))


def _check_parent(root: Path, target: Path) -> None:
    """No directory on the way to `target` may be a symlink (a link unpacked earlier must not
    redirect later members outside the folder)."""
    current = target.parent
    while current != root:
        if current.is_symlink():
            raise UnsafeArchive(f"archive writes through the link {current.relative_to(root)}")
        if root not in current.parents:
            raise UnsafeArchive(f"archive member {target} escapes the folder")
        current = current.parent


def _hoist_single_directory(destination: Path) -> None:
    entries = list(destination.iterdir())
    if len(entries) != 1 or entries[0].is_symlink() or not entries[0].is_dir():
        return
    inner = entries[0]
    holding = destination / f".hoist-{os.getpid()}-{id(inner)}"
    inner.rename(holding)
    for child in list(holding.iterdir()):
        child.rename(destination / child.name)
    holding.rmdir()
