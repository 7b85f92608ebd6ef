"""TAILORD_METRICS_AUTH=true puts /metrics behind the admin token; health checks stay open."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.metrics import Metrics
from deploy.service import DaemonService
from deploy.settings import load_settings


class Stream:
    def reachable(self) -> bool:
        return True

    def lag(self) -> dict[int, int]:
        return {}


def get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A DaemonService's HTTP server; yields start(metrics_auth) -> base URL."""
    for name in list(os.environ):
        if name.startswith("TAILORD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    servers = []

    def start(metrics_auth: bool | None) -> str:
        overrides = {} if metrics_auth is None else {"metrics_auth": metrics_auth}
        settings = load_settings(state_dir=tmp_path, http_port=0, admin_token="tok", **overrides)
        service = DaemonService(settings, Metrics(), None, None, None, Stream(), None)
        servers.append(service.start_http())
        return f"http://127.0.0.1:{servers[-1].port}"

    yield start
    for server in servers:
        server.stop()


def test_metrics_behind_the_token_when_asked(daemon) -> None:
    url = daemon(True)
    assert get(url + "/metrics") == 401
    assert get(url + "/metrics", "wrong") == 401
    assert get(url + "/metrics", "tok") == 200
    assert get(url + "/healthz") == 200 and get(url + "/readyz") == 200


@pytest.mark.parametrize("metrics_auth", [None, False])
def test_metrics_open_by_default(daemon, metrics_auth) -> None:
    assert get(daemon(metrics_auth) + "/metrics") == 200


def test_the_setting_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILORD_METRICS_AUTH", "true")
    assert load_settings().metrics_auth is True
