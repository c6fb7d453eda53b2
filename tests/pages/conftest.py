"""The page tests' browser: Debian's Chromium, installed on first use when missing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pages.browser import Browser, ensure_chromium


@pytest.fixture(scope="session")
def chromium_ready() -> None:
    why = ensure_chromium()
    if why:
        pytest.skip(f"no headless Chromium for the page tests: {why}")


@pytest.fixture()
def browser(chromium_ready: None) -> Iterator[Browser]:
    session = Browser()
    try:
        yield session
    finally:
        session.close()
