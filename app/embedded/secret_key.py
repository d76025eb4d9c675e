"""The embedded setup's SELFHEAL_SECRET_KEY: a random key generated on first start and kept in
the data folder (`secret-key`, mode 0600), so a machine that runs `selfheal up` without
DATABASE_URL never seals secrets under a published key.

The file is part of the data: the plugin and webhook secrets stored in the embedded
PostgreSQL are sealed under it, so back it up with the rest of SELFHEAL_DATA_DIR. Several
processes starting at once (`selfheal up` and a CLI command) agree on one key: the file is
written under a temporary name and linked into place, which fails for all but the first."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

KEY_FILE = "secret-key"
_KEY_BYTES = 48  # token_urlsafe(48): 64 characters, 384 random bits


class SecretKeyFileError(RuntimeError):
    """The key file exists but cannot be used; the message names the file and the fix."""


def key_file(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().absolute() / KEY_FILE


def load_or_create_secret_key(data_dir: Path) -> str:
    """The key in `data_dir/secret-key`, created (mode 0600) if there is none."""
    path = key_file(data_dir)
    if not path.exists():
        _create(path)
    return _read(path)


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    # O_EXCL | O_NOFOLLOW: never write through a file or symlink someone left in our place.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have removed bits; nobody else may read it
        os.write(fd, (secrets.token_urlsafe(_KEY_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process was first: its key is the key
    except FileExistsError:
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read(path: Path) -> str:
    try:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise SecretKeyFileError(f"{path} is not a regular file; remove it")
        if info.st_mode & 0o077:
            raise SecretKeyFileError(
                f"{path} is readable by other users (mode {stat.S_IMODE(info.st_mode):o}):"
                f" it holds the key of the stored secrets; run `chmod 600 {path}`"
            )
        key = path.read_text().strip()
    except OSError as exc:
        raise SecretKeyFileError(f"cannot read the secret key file {path}: {exc}") from None
    if not key:
        raise SecretKeyFileError(
            f"{path} is empty; restore it from a backup (the stored secrets are sealed under"
            " it), or remove it to generate a new key and issue every plugin a new secret"
        )
    return key
