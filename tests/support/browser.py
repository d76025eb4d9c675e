"""The ops dashboard in a real browser: Playwright (the Python package only) driving Debian's
chromium at /usr/bin/chromium, headless, without the sandbox (CI runs as root in a container).
`playwright install` is never needed: `.ci/run` installs the chromium package with apt-get.

- browser_unavailable: why no browser can run here (None when one can); a test skips with it,
  or fails when SELFHEAL_BROWSER_TESTS=required (what .ci/run sets).
- Shots: numbered screenshots into one directory per run.
- sign_in, submit, until_shows: the sign-in form filled like a person does, a form posted and
  the page it leads to loaded, and a page reloaded until it shows what the test waits for
  (bounded polling on page content)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.settings import REPO

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page, Playwright

    from tests.support.personas import Persona

CHROMIUM = Path(os.environ.get("SELFHEAL_CHROMIUM", "/usr/bin/chromium"))
# "required": a browser that cannot start fails the test instead of skipping it (CI).
REQUIRED = os.environ.get("SELFHEAL_BROWSER_TESTS", "").strip().lower() == "required"
VIEWPORT = {"width": 1280, "height": 800}
# Where each run's screenshots go: SELFHEAL_BROWSER_SHOTS, else under .selfheal-test/
# (ignored by git), one directory per run.
SHOTS_ROOT = Path(os.environ.get("SELFHEAL_BROWSER_SHOTS", REPO / ".selfheal-test" / "browser"))


def browser_unavailable() -> str | None:
    """Why the browser test cannot run on this machine; None when it can (as far as can be
    told without starting chromium)."""
    if importlib.util.find_spec("playwright") is None:
        return (
            "the playwright package is not installed (pip install -e '.[dev]'; the browser is"
            " Debian's chromium, no `playwright install`)"
        )
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)"
    return None


async def launch(playwright: Playwright) -> Browser:
    return await playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
    )


class Shots:
    """Screenshots numbered in the order taken: 01-signed-in.png, 02-..., in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.taken: list[Path] = []

    @classmethod
    def for_run(cls, name: str) -> Shots:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        directory = SHOTS_ROOT / f"{name}-{stamp}-{os.getpid()}"
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory)

    async def take(self, page: Page, name: str, *, full_page: bool = False) -> Path:
        path = self.directory / f"{len(self.taken) + 1:02d}-{name}.png"
        await page.screenshot(path=str(path), full_page=full_page)
        self.taken.append(path)
        return path


async def sign_in(page: Page, base_url: str, persona: Persona) -> None:
    """Through the sign-in form, as a person would; ends on the page it leads to."""
    await page.goto(f"{base_url}/ops/login")
    await page.get_by_label("User name").fill(persona.username)
    await page.get_by_label("Password").fill(persona.password)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(lambda url: "/ops/login" not in url)
    header = await page.locator("header").inner_text()
    assert f"Signed in as {persona.username}" in header, header


async def submit(page: Page, button: Locator) -> None:
    """Click a form's submit button and wait for the page it leads to (POST, 303, GET: often
    the same URL again, so waiting for a URL would not do)."""
    async with page.expect_navigation():
        await button.click()


async def until_shows(
    page: Page,
    url: str,
    shown: Callable[[Page], Awaitable[bool]],
    what: str,
    *,
    timeout_s: float,
    poll_s: float = 1.0,
) -> None:
    """Load `url` again and again until `shown(page)` is true, for at most `timeout_s`; the
    failure names `what` and quotes the page as it was last seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        await page.goto(url)
        if await shown(page):
            return
        if time.monotonic() >= deadline:
            text = await page.locator("body").inner_text()
            raise AssertionError(
                f"{what}: not shown within {timeout_s:g} s at {url}; the page shows:\n{text[:4000]}"
            )
        await asyncio.sleep(poll_s)


def text_in(selector: str, *texts: str) -> Callable[[Page], Awaitable[bool]]:
    """A `shown` for until_shows: every one of `texts` is in the text of `selector`."""

    async def shown(page: Page) -> bool:
        found = await page.locator(selector).all_inner_texts()
        joined = "\n".join(found)
        return all(text in joined for text in texts)

    return shown
