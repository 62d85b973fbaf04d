"""Debian's Chromium driven by Playwright (PyPI ``playwright``, no browser download): the browser
tests' one way to start a browser.

Chromium runs as root here, hence ``--no-sandbox``; the background-networking flags keep it from
reaching for Google's hosts, which this machine's closed network refuses. Each test gets a fresh
context (no cookies carried over). Screenshots go to ``artifacts`` for people to look at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from playwright.async_api import Browser, async_playwright

CHROMIUM_PACKAGE = "chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 15_000


def install_chromium() -> str:
    """Debian's ``chromium``, installed once (idempotent: apt-get does nothing when it is there);
    a description of what went wrong, or ``""``."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "chromium is not installed, and this is not a root Debian machine that could install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", CHROMIUM_PACKAGE]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            return f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}"
    return ""


def chromium_path() -> tuple[str | None, str]:
    """The browser's path, installing it where possible; ``(None, why)`` when impossible."""
    path = shutil.which("chromium")
    if path is not None:
        return path, ""
    problem = install_chromium()
    return shutil.which("chromium"), problem or "still not on PATH"


@contextlib.asynccontextmanager
async def chromium(executable: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


def artifacts_dir(name: str) -> Path:
    """Where a test's screenshots go: ``test-artifacts/<name>/`` in the checkout (ignored by git)."""
    path = Path(__file__).resolve().parents[2] / "test-artifacts" / name
    path.mkdir(parents=True, exist_ok=True)
    return path
