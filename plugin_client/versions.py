"""Version strings: which ones are acceptable, and how they compare.

Dotted numbers compare as numbers (1.10.0 > 1.9.2) and trailing zeros do not count
(1.2 == 1.2.0). A pre-release suffix ranks below the same numbers without one
(1.2.3-rc1 < 1.2.3); suffixes compare piece by piece, numbers as numbers (rc2 < rc10).
Build metadata after `+` is ignored (2.0.0+build.5 == 2.0.0). A version that does not start
with a number ranks below every version that does. This is the order the control plane uses
to pick candidates, so both sides agree on what "newer" means."""

from __future__ import annotations

import re

# The control plane accepts the same shape (app/plugins/schemas.py): digits first, then a
# conservative charset. The client also uses versions as folder names, so this matters.
VERSION_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+){0,3}([-+.][0-9A-Za-z.+-]*)?$")
_MAX_LENGTH = 64
_LEADING_NUMBERS = re.compile(r"^([0-9]+(?:\.[0-9]+)*)(.*)$", re.DOTALL)
_SUFFIX_PIECES = re.compile(r"[0-9]+|[A-Za-z]+")

VersionKey = tuple[int, tuple[int, ...], int, tuple[tuple[int, int, str], ...], str]


def is_valid_version(version: str) -> bool:
    """A version the control plane accepts and that is safe as a folder name."""
    return len(version) <= _MAX_LENGTH and VERSION_PATTERN.match(version) is not None


def version_key(version: str) -> VersionKey:
    """A sort key: `version_key(a) < version_key(b)` when a is older than b."""
    core = version.split("+", 1)[0]
    match = _LEADING_NUMBERS.match(core)
    if match is None:
        return (0, (), 0, (), version)
    numbers = [int(part) for part in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    suffix = match.group(2)
    # Numeric pieces rank below alphabetic ones (as in semver pre-release identifiers).
    pieces = tuple(
        (0, int(piece), "") if piece.isdigit() else (1, 0, piece)
        for piece in _SUFFIX_PIECES.findall(suffix)
    )
    return (1, tuple(numbers), 0 if suffix else 1, pieces, suffix)


def compare_versions(a: str, b: str) -> int:
    """-1 when a is older than b, 0 when they rank the same, 1 when a is newer."""
    key_a, key_b = version_key(a), version_key(b)
    return (key_a > key_b) - (key_a < key_b)


def is_newer(candidate: str, current: str) -> bool:
    return compare_versions(candidate, current) > 0
