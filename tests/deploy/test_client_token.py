"""The admin client's token: not on the command line, only to the configured daemon, never redirected."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import structlog

from deploy.cli import main
from deploy.errors import UsageError
from deploy.http_api import TOKEN_FILE
from deploy.snapshot_client import AdminError, admin_get, resolve_endpoint, same_endpoint


class Recorder:
    """A tiny HTTP server recording each request's path and Authorization header."""

    def __init__(self, redirect_to: str | None = None) -> None:
        self.seen: list[tuple[str, str | None]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                recorder.seen.append((self.path, self.headers.get("Authorization")))
                if redirect_to is not None:
                    self.send_response(307)
                    self.send_header("Location", redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers():
    started: list[Recorder] = []

    def start(redirect_to: str | None = None) -> Recorder:
        started.append(Recorder(redirect_to))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No TAILORD_* from outside; cwd without .env; returns the state dir the settings name."""
    for name in list(os.environ):
        if name.startswith("TAILORD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("TAILORD_STATE_DIR", str(state))
    return state


@pytest.fixture
def restore_logging():
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_redirects_are_refused_and_the_token_never_follows(servers) -> None:
    elsewhere = servers()
    daemon = servers(redirect_to=elsewhere.url)
    with pytest.raises(AdminError, match="HTTP 307: redirected to .* not followed"):
        admin_get(daemon.url, "/admin/status", "tok")
    assert daemon.seen == [("/admin/status", "Bearer tok")]
    assert elsewhere.seen == []


def test_the_env_token_goes_only_to_the_configured_daemon(servers, env, monkeypatch) -> None:
    daemon = servers()
    port = daemon.url.rsplit(":", 1)[1]
    monkeypatch.setenv("TAILORD_HTTP_PORT", port)
    monkeypatch.setenv("TAILORD_ADMIN_TOKEN", "env-token")
    assert resolve_endpoint(None, None, None) == (daemon.url, "env-token")
    assert resolve_endpoint(f"http://localhost:{port}/", None, None) == (f"http://localhost:{port}", "env-token")
    other = servers()
    with pytest.raises(UsageError, match="not the configured daemon"):
        resolve_endpoint(other.url, None, None)
    assert other.seen == []
    (env.parent / "t").write_text("file-token\n")
    assert resolve_endpoint(other.url, None, None, env.parent / "t") == (other.url, "file-token")


def test_the_state_dir_token_goes_only_to_the_configured_daemon(env, monkeypatch) -> None:
    monkeypatch.setenv("TAILORD_HTTP_PORT", "9123")
    (env / TOKEN_FILE).write_text("generated\n")
    assert resolve_endpoint(None, None, None) == ("http://127.0.0.1:9123", "generated")
    with pytest.raises(UsageError):
        resolve_endpoint("http://127.0.0.1:9124", None, None)
    with pytest.raises(UsageError):
        resolve_endpoint("http://evil.example:9123", None, None)


def test_same_endpoint() -> None:
    assert same_endpoint("http://localhost:8080", "http://127.0.0.1:8080")
    assert same_endpoint("http://[::1]:8080/", "http://127.0.0.1:8080")
    assert same_endpoint("http://h", "http://h:80") and same_endpoint("https://h", "http://h:443")
    assert not same_endpoint("http://h:8080", "http://127.0.0.1:8080")
    assert not same_endpoint("http://localhost:8081", "http://localhost:8080")
    assert not same_endpoint("http://127.0.0.1:8080@evil.example:8080", "http://127.0.0.1:8080")
    assert not same_endpoint("http://[bad", "http://127.0.0.1:8080")


def test_token_option_is_deprecated_but_works(servers, env, capsys, restore_logging) -> None:
    daemon = servers()
    assert main(["status", "--url", daemon.url, "--token", "cli-token"]) == 0
    err = capsys.readouterr().err
    assert "--token is deprecated" in err and "cli-token" not in err
    assert daemon.seen[-1][1] == "Bearer cli-token"


def test_token_file_option(servers, env, capsys, restore_logging, tmp_path) -> None:
    daemon = servers()
    (tmp_path / "token").write_text("  from-file \n")
    assert main(["status", "--url", daemon.url, "--token-file", str(tmp_path / "token")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert daemon.seen[-1][1] == "Bearer from-file"
    assert main(["status", "--url", daemon.url, "--token-file", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--token-file" in err
