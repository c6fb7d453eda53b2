"""The live pages' server: loopback by default, TLS and a token otherwise (refused in one line
without), and the hospital's page shows only what its audit trail, ledger and log hold."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from fedtune.cli import main
from fedtune.errors import ConfigError
from fedtune.pages.serve import PageServer, check_bind


def state(query: dict[str, str]) -> dict[str, Any]:
    return {"title": "t", "asked": query, "nan": float("nan")}


def outward_ip() -> str:
    """This machine's address on its network (not loopback), or '' when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: it only picks the route's source address
            ip = str(s.getsockname()[0])
        except OSError:
            return ""
    return "" if ip.startswith("127.") else ip


def test_a_loopback_page_serves_its_files_and_state(tmp_path: Path) -> None:
    page = PageServer("127.0.0.1", 0, state, page="coordinator.html", setting="--page").start()
    try:
        with urllib.request.urlopen(page.url, timeout=5) as answer:
            html = answer.read().decode()
            assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
        assert '<script src="/static/charts.js"' in html and "http" not in html.replace("charset", "")
        with urllib.request.urlopen(page.url + "api/state?run=r1", timeout=5) as answer:
            assert json.loads(answer.read()) == {"title": "t", "asked": {"run": "r1"}, "nan": None}
        for name in ("charts.js", "coordinator.js", "hospital.js", "page.css", "hospital.html"):
            with urllib.request.urlopen(page.url + "static/" + name, timeout=5) as answer:
                assert b"http://" not in answer.read().replace(b"http://www.w3.org/2000/svg", b"")  # no CDN
        rebound = urllib.request.Request(page.url + "api/state", headers={"Host": f"evil.example:{page.port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=5)
        assert refused.value.code == 403  # a name re-pointed at 127.0.0.1 gets nothing
        for bad in ("static/../serve.py", "static/.hidden", "nothing"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(page.url + bad, timeout=5)
            assert err.value.code == 404
    finally:
        page.stop()


@pytest.mark.parametrize(
    ("host", "tls", "token", "missing"),
    [("0.0.0.0", False, "", "TLS and a token"), ("10.1.2.3", True, "", "a token"), ("::", False, "x" * 20, "TLS")],
)
def test_a_page_off_loopback_without_tls_and_token_is_refused(host: str, tls: bool, token: str, missing: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_bind(host, 9095, setting="--page", tls=tls, token=token, how="do this")
    said = str(err.value)
    assert said.startswith(f"`--page` {host}:9095 is not loopback") and f"it has no {missing}; do this" in said
    check_bind("127.0.0.1", 9095, setting="--page", tls=False, token="", how="")  # loopback needs neither
    check_bind("localhost", 9095, setting="--page", tls=False, token="", how="")


def test_the_commands_refuse_a_page_off_loopback_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--watch", "--watch-address", "0.0.0.0:8080", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`--watch-address` 0.0.0.0:8080 is not loopback" in err
    assert not (tmp_path / "run").exists()  # refused before anything was prepared
    home = str(tmp_path / "coordinator")
    start = ["server", "start", "--home", home, "--address", "10.0.0.7", "--page", "0.0.0.0:9095"]
    assert main([*start, "--insecure"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`--page` 0.0.0.0:9095 is not loopback" in err and "drop `--insecure`" in err
    pki = str(tmp_path / "coordinator" / "pki")
    assert main(["pki", "ca", "--out", pki]) == 0
    assert main(["pki", "server", "--ca", pki, "--out", pki, "--address", "10.0.0.7"]) == 0
    capsys.readouterr()
    assert main(start) == 2  # TLS now, but no token
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it has no a token; give `--page-token-file FILE`" in err
    (tmp_path / "short").write_text("abc\n")
    assert main([*start, "--page-token-file", str(tmp_path / "short")]) == 2
    assert "the token must be 16+ characters" in capsys.readouterr().err
    assert not (tmp_path / "coordinator" / "server.json").exists()  # nothing started


def test_off_loopback_a_page_answers_only_tls_with_its_token(tmp_path: Path) -> None:
    from fedtune.security import pki

    ip = outward_ip()
    if not ip:
        pytest.skip("this machine has no address besides loopback to be reached from 'outside' on")
    pki.create_ca(tmp_path)
    files = pki.issue_server_cert(tmp_path, tmp_path, [ip])
    token = "s3cret-token-of-the-page-0123"
    page = PageServer(
        "0.0.0.0",
        0,
        state,
        page="coordinator.html",
        setting="--page",
        token=token,
        certfile=files.cert,
        keyfile=files.key,
    ).start()
    try:
        plain = http.client.HTTPConnection(ip, page.port, timeout=5)  # plain HTTP to the TLS port: no page
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain.request("GET", "/api/state")
            plain.getresponse().read()
        context = ssl.create_default_context(cafile=str(pki.CAFiles.at(tmp_path).cert))
        url = f"https://{ip}:{page.port}"
        for path, headers in (
            ("/", {}),
            ("/api/state", {}),
            ("/api/state?token=wrong", {"Authorization": "Bearer no"}),
        ):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=5, context=context)
            assert err.value.code == 401
        with urllib.request.urlopen(f"{url}/?token={token}", timeout=5, context=context) as answer:
            cookie = answer.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
        request = urllib.request.Request(url + "/api/state", headers={"Cookie": cookie.split(";")[0]})
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            assert json.loads(answer.read())["title"] == "t"
        request = urllib.request.Request(url + "/api/state", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            assert answer.status == 200
    finally:
        page.stop()
