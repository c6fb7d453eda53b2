"""The coordinator's live page: its SuperLink, registered hospitals, runs, and one run's
rounds, hospitals and curves (:mod:`fedtune.pages`), served by ``fedtune server start``.

``--page HOST:PORT`` (default ``127.0.0.1:9095``; ``off`` serves none). On loopback it
is plain HTTP and needs nothing more; reach it from elsewhere through an SSH tunnel. Any other address
needs TLS (the coordinator's own certificate, ``pki/server.pem``, so not with
``--insecure``) and a token (``--page-token-file``): refused otherwise, in one line.
The state is what ``fedtune status --json`` reads (the SuperLink's node list, each run's
``status.json`` and ``metrics.jsonl``), kept for a few seconds so that a page polled
every second does not start a ``flwr`` process every second.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError, FedTuneError
from fedtune.server.home import CoordinatorHome

if TYPE_CHECKING:
    from fedtune.pages.serve import PageServer

DEFAULT_PAGE = "127.0.0.1:9095"
MIN_TOKEN = 16


class CoordinatorState:
    """``/api/state`` of the coordinator's page; ``?run=NAME`` picks the run shown."""

    def __init__(self, home: CoordinatorHome, *, ttl: float = 3.0) -> None:
        self.home, self.ttl = home, ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def _status(self) -> dict[str, Any]:
        from fedtune.server.status import status_data

        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.ttl:
                try:
                    data = status_data(self.home)
                except FedTuneError as err:  # the SuperLink is starting or gone: say so, keep the runs
                    data = {
                        "superlink": f"SuperLink of {self.home.root}: {err}",
                        "hospitals": [],
                        "runs": [],
                        "live": {},
                    }
                self._cached = (time.monotonic(), data)
            return self._cached[1]

    def current_run(self, data: dict[str, Any], wanted: str = "") -> str:
        names = [r["run"] for r in data["runs"]]
        if wanted in names:
            return wanted
        if data["live"]:
            return str(next(iter(data["live"])))
        folders = [self.home.runs_dir / n for n in names]
        return max(folders, key=lambda f: f.stat().st_mtime).name if folders else ""

    def __call__(self, query: dict[str, str]) -> dict[str, Any]:
        from fedtune.pages.runview import run_view

        data = self._status()
        names = {int(entry["node-id"]): name for name, entry in self.home.registry().items()}
        run = self.current_run(data, query.get("run", ""))
        registry = [
            {**{k: str(h[k]) for k in ("hospital", "node id", "status", "online since")}, "last seen": _last_seen(h)}
            for h in data["hospitals"]
        ]
        return {
            "title": "fedtune coordinator",
            "kind": "coordinator",
            "superlink": data["superlink"],
            "registry": registry,
            "runs": data["runs"],
            "view": run_view(self.home.runs_dir / run, names=names) if run else None,
        }


def _last_seen(hospital: dict[str, Any]) -> str:
    """Flower counts a node online while its heartbeats (every 30 s) arrive; that is all it tells."""
    if hospital["status"] == "online":
        return "within 60 s (heartbeats)"
    return str(hospital.get("offline at", "-"))


def coordinator_page(home: CoordinatorHome, page: str, *, token_file: str | None, insecure: bool) -> PageServer | None:
    """The page's server, bound (not started): refused in one line before anything else starts."""
    from fedtune.pages.serve import PageServer, is_loopback, page_address

    if page == "off":
        return None
    host, port = page_address(page, "--page")
    token = _token(Path(token_file)) if token_file else ""
    how = (
        "drop `--insecure` (the page then uses the coordinator's TLS certificate) and give `--page-token-file`"
        if insecure
        else "give `--page-token-file FILE` (a secret of 16 or more characters)"
    )
    # on loopback plain HTTP (the certificate names the public address, not 127.0.0.1)
    tls = not is_loopback(host) and not insecure and home.tls.cert.exists() and home.tls.key.exists()
    return PageServer(
        host,
        port,
        CoordinatorState(home),
        page="coordinator.html",
        setting="--page",
        token=token,
        certfile=home.tls.cert if tls else None,
        keyfile=home.tls.key if tls else None,
        how=how,
    )


def _token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"`--page-token-file` {path}: unreadable ({err.strerror})") from err
    if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
        raise ConfigError(
            f"`--page-token-file` {path}: the token must be {MIN_TOKEN}+ characters without spaces; "
            "make one with `python -c 'import secrets; print(secrets.token_urlsafe(24))' > FILE`"
        )
    return token
