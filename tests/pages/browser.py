"""A real headless Chromium for the page tests, driven over WebDriver by Debian's chromedriver.

No client library: chromedriver speaks the W3C WebDriver protocol (JSON over HTTP), and
the few calls the tests need (open a URL, run a script, take a screenshot) are one
request each. The binaries are Debian's (``/usr/bin/chromium``, ``/usr/bin/chromedriver``);
nothing is downloaded at run time.
"""

from __future__ import annotations

import base64
import fcntl
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
APT = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]


def ensure_chromium() -> str:
    """'' when Chromium and its driver are there (installed from Debian's packages if missing), else why not.

    pytest-xdist's workers may ask at the same moment: one installs under a lock while the
    other waits; a fresh machine's stale package lists are refreshed once when the install fails.
    """
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return ""
    if shutil.which("apt-get") is None:
        return "no Chromium and no apt-get to install it (Debian's `chromium` and `chromium-driver`)"
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    with open(Path(tempfile.gettempdir()) / "fedtune-chromium-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if CHROMIUM.exists() and CHROMEDRIVER.exists():  # the other worker installed it
            return ""
        done = subprocess.run(APT, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            done = subprocess.run(APT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return f"`{' '.join(APT)}` failed: {(done.stderr or done.stdout).strip()[-300:]}"
    return ""


class Browser:
    """One headless Chromium session (its own chromedriver process on a free loopback port)."""

    def __init__(self, *, width: int = 1400, height: int = 1300) -> None:
        from fedtune.launcher import free_port

        port = free_port()
        self.driver = subprocess.Popen(
            [str(CHROMEDRIVER), f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{port}"
        options = {
            "binary": str(CHROMIUM),
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--window-size={width},{height}",
                "--no-first-run",
                "--disable-extensions",
            ],
        }
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        deadline = time.monotonic() + 30
        while True:
            try:
                self.session = self._call("POST", "/session", caps)["sessionId"]
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or self.driver.poll() is not None:
                    self.driver.kill()
                    raise
                time.sleep(0.2)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())["value"]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"WebDriver {method} {path}: {err.read()[:500]!r}") from err

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body: ``return ...``) in the page."""
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def text(self, selector: str) -> str:
        return str(self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", selector))

    def wait(self, script: str, what: str, limit: float = 120.0) -> Any:
        """Poll ``script`` until it returns something truthy; fail naming ``what``."""
        deadline = time.monotonic() + limit
        while True:
            value = self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {what} in {limit:.0f} s")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot")))

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
