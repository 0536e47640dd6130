"""Browser tests: Debian's Chromium driven by Playwright against a served Corral."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "build" / "e2e-screenshots"
VENDOR = ROOT / "src" / "corral" / "web" / "static" / "vendor"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def vendored() -> None:
    """The console's htmx and xterm.js, vendored from npm (a no-op when up to date)."""
    subprocess.run([str(ROOT / "scripts" / "build-web.sh")], check=True)
    assert (VENDOR / "xterm.js").is_file()


@pytest.fixture(scope="session")
def browser(vendored: None) -> Iterator[object]:
    if not CHROMIUM.exists():
        print("skipping the browser tests: /usr/bin/chromium is missing (apt-get install chromium)")
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        found = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield found
        finally:
            found.close()


@pytest.fixture(scope="session")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS
