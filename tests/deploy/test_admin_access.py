"""Browsers cannot drive the admin API: a token always exists, Host and Origin are checked.

Without TAILORD_ADMIN_TOKEN the daemon writes a fresh token to `<state>/admin.token`
(0600) that `tailord status`/`snapshot` pick up; a page on another site cannot POST a
"simple" multipart form to /admin/snapshots, and a DNS-rebound page (its own Host
header) gets 403 even for what it could otherwise read.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from deploy.http_api import (
    TOKEN_FILE,
    HostPolicy,
    read_token_file,
    split_host,
    start_http,
    write_token_file,
)
from deploy.multipart import encode_form_data
from deploy.service import DaemonService
from deploy.settings import SettingsError, load_settings
from deploy.snapshot_client import AdminError, admin_get, resolve_endpoint


class Backend:
    def __init__(self) -> None:
        self.posts = 0

    def metrics_text(self) -> bytes:
        return b"tailord_up 1\n"

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {}

    def status(self) -> dict[str, Any]:
        return {"experience": 3}

    def create_snapshot(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        self.posts += 1
        return 201, {"name": "made"}

    def get_snapshot(self, name: str) -> dict[str, Any]:
        return {"name": name}

    def snapshot_file(self, name: str, filename: str) -> Path:
        raise NotImplementedError


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, bytes]:
    """`headers` replace http.client's own (Host included)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = dict(headers or {})
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def serve():
    servers = []

    def start(token: str | None, host: str = "127.0.0.1", **kwargs: Any):
        backend = Backend()
        server = start_http(host, 0, backend, token, 1 << 20, **kwargs)
        servers.append(server)
        return server.port, backend

    yield start
    for server in servers:
        server.stop()


def form() -> tuple[str, bytes]:
    return encode_form_data({"strategy": "route"}, [("images", "a.png", b"\x89PNG")])


# ---- the generated token

def test_generated_token_file_is_0600_fresh_each_time_and_never_follows_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / TOKEN_FILE).symlink_to(victim)
    token, path = write_token_file(tmp_path)
    assert path == tmp_path / TOKEN_FILE and not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == token and len(token) >= 40
    assert victim.read_text() == "keep"
    again, _ = write_token_file(tmp_path)
    assert again != token and read_token_file(path) == again
    assert sorted(p.name for p in tmp_path.iterdir()) == [TOKEN_FILE, "victim"]  # no temporary left


def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TAILORD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env


def test_daemon_without_a_token_generates_one_that_the_client_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch, tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("TAILORD_STATE_DIR", str(state))
    monkeypatch.setenv("TAILORD_HTTP_PORT", "0")
    service = DaemonService(load_settings(), None, None, None, None, None, None)
    server = service.start_http()
    try:
        path = state / TOKEN_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        url = f"http://127.0.0.1:{server.port}"
        with pytest.raises(AdminError, match="HTTP 401"):
            admin_get(url, "/admin/snapshots/x", None)
        monkeypatch.setenv("TAILORD_HTTP_PORT", str(server.port))  # what `tailord status` would be told
        resolved_url, token = resolve_endpoint(None, None, None)  # from TAILORD_STATE_DIR/admin.token
        assert resolved_url == url
        assert token == read_token_file(path)
        with pytest.raises(AdminError, match="HTTP 404: no snapshot"):  # past the token check
            admin_get(resolved_url, "/admin/snapshots/x", token)
    finally:
        server.stop()


def test_a_configured_token_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("TAILORD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TAILORD_HTTP_PORT", "0")
    monkeypatch.setenv("TAILORD_ADMIN_TOKEN", "configured")
    (tmp_path / "state").mkdir()
    server = DaemonService(load_settings(), None, None, None, None, None, None).start_http()
    try:
        assert not (tmp_path / "state" / TOKEN_FILE).exists()
        with pytest.raises(AdminError, match="HTTP 404"):
            admin_get(f"http://127.0.0.1:{server.port}", "/admin/snapshots/x", "configured")
    finally:
        server.stop()


# ---- cross-origin requests

def test_cross_origin_form_post_without_the_token_is_refused(serve) -> None:
    port, backend = serve("tok")
    content_type, body = form()
    for origin in ("http://evil.example", None):
        headers = {"Content-Type": content_type, **({"Origin": origin} if origin else {})}
        code, _ = request(port, "POST", "/admin/snapshots", headers, body)
        assert code in (401, 403)
    assert backend.posts == 0


def test_a_foreign_origin_is_refused_even_with_the_token_or_without_auth(serve) -> None:
    for token in ("tok", None):  # None: TAILORD_ADMIN_TOKEN="" turned the token off
        port, backend = serve(token)
        content_type, body = form()
        auth = {"Authorization": "Bearer tok"} if token else {}
        for origin in ("http://evil.example", f"http://evil.example:{port}", "null",
                       f"http://127.0.0.1:{port + 1}", "file://"):
            code, _ = request(port, "POST", "/admin/snapshots",
                              {"Content-Type": content_type, "Origin": origin, **auth}, body)
            assert code == 403, origin
        assert backend.posts == 0
        code, _ = request(port, "POST", "/admin/snapshots",
                          {"Content-Type": content_type, "Origin": f"http://localhost:{port}", **auth}, body)
        assert code == 201 and backend.posts == 1


# ---- Host header (DNS rebinding)

@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "localhost",
                                  "127.0.0.1.evil.example:{port}", "10.0.0.1:{port}", "[::1]:1", "::1",
                                  "localhost:{port}@evil", ""])
def test_a_wrong_host_header_is_refused(serve, host: str) -> None:
    port, _ = serve("tok")
    headers = {"Host": host.format(port=port), "Authorization": "Bearer tok"}
    code, body = request(port, "GET", "/admin/status", headers)
    assert code == 403 and b"experience" not in body
    assert request(port, "GET", "/", headers)[0] == 403  # any page besides the open three
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapers: open by design
        assert request(port, "GET", path, headers)[0] == 200


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}",
                                  "[::1]:{port}", "localhost.:{port}"])
def test_loopback_names_with_the_bound_port_are_served(serve, host: str) -> None:
    port, _ = serve("tok")
    code, body = request(port, "GET", "/admin/status", {"Host": host.format(port=port),
                                                        "Authorization": "Bearer tok"})
    assert code == 200 and json.loads(body) == {"experience": 3}


def test_allowed_hosts_admit_a_proxy_name(serve) -> None:
    port, _ = serve("tok", allowed_hosts="tailord.example, other.example:8443")
    auth = {"Authorization": "Bearer tok"}
    assert request(port, "GET", "/admin/status", {"Host": "tailord.example", **auth})[0] == 200
    assert request(port, "GET", "/admin/status", {"Host": "other.example:8443", **auth})[0] == 200
    assert request(port, "GET", "/admin/status", {"Host": "other.example:8444", **auth})[0] == 403
    assert request(port, "GET", "/admin/status", {"Host": f"127.0.0.1:{port}", **auth})[0] == 200


def test_host_policy() -> None:
    assert split_host("[::1]:80") == ("::1", 80) and split_host("Example.COM") == ("example.com", None)
    for bad in ("::1", "a:b", "[::1", "[::1]x", "a/b:1", "", "a:123456"):
        assert split_host(bad) is None, bad
    wildcard = HostPolicy.of("0.0.0.0", 8080, None)
    assert wildcard.allows("tailord:8080") and wildcard.allows("anything") and wildcard.allows("x:18080")
    restricted = HostPolicy.of("0.0.0.0", 8080, "tailord")
    assert restricted.allows("tailord:1") and restricted.allows("localhost:8080") and not restricted.allows("x:8080")
    one = HostPolicy.of("10.1.2.3", 80, None)
    assert one.allows("10.1.2.3") and one.allows("10.1.2.3:80") and not one.allows("localhost")
    assert HostPolicy.of("::1", 8080, None).allows("[::1]:8080")
    assert HostPolicy.of("127.0.0.1", 8080, "*").allows("whatever:1")
    assert HostPolicy.of("127.0.0.1", 443, None).allows_origin("https://localhost")
    assert not HostPolicy.of("127.0.0.1", 8080, None).allows_origin("http://localhost:8080/path")


def test_bad_allowed_hosts_setting_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILORD_HTTP_ALLOWED_HOSTS", "ok.example,bad/host")
    with pytest.raises(SettingsError, match="TAILORD_HTTP_ALLOWED_HOSTS.*bad/host"):
        load_settings()
