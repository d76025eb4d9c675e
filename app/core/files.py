"""Secret files on disk: written so that only their owner can read them."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, content: str) -> None:
    """Write a secret file only its owner can read (0600), atomically: a reader never sees it
    half-written, and it is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(content)
    os.replace(staging, path)
