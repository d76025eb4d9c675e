"""What a tenant id, a plugin name, a version and an env may look like: one set of rules for
registration, releases, the plugin API's validation and manual actions. Pattern strings for
pydantic fields, compiled ones for code."""

from __future__ import annotations

import re

from app.core.errors import Invalid

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$"
PLUGIN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# Dotted numbers (up to four), then an optional pre-release/build suffix: 1.2.3, 2.0.0-rc.1.
VERSION_PATTERN = r"^[0-9]+(\.[0-9]+){0,3}([-+.][0-9A-Za-z.+-]*)?$"
ENV_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"

TENANT = re.compile(TENANT_PATTERN)
PLUGIN = re.compile(PLUGIN_PATTERN)
VERSION = re.compile(VERSION_PATTERN)
ENV = re.compile(ENV_PATTERN)


def check(*rules: tuple[str, str, re.Pattern[str]]) -> None:
    """Each (option, value, pattern): Invalid naming the first option whose value does not
    match, as `--option 'value' is not valid (expected ...)`."""
    for label, value, pattern in rules:
        if not pattern.match(value):
            raise Invalid(
                f"--{label} {value!r} is not valid (expected {pattern.pattern})", field=label
            )
