"""The HTTP server drops idle and slow clients and caps concurrent connections."""

from __future__ import annotations

import http.client
import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from deploy.http_api import start_http


class Backend:
    """Answers health checks; a snapshot request echoes the size of the body it got."""

    def metrics_text(self) -> bytes:
        return b""

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {}

    def status(self) -> dict[str, Any]:
        return {}

    def create_snapshot(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        return 201, {"bytes": len(body)}

    def get_snapshot(self, name: str) -> dict[str, Any]:
        return {}

    def snapshot_file(self, name: str, filename: str) -> Path:
        raise NotImplementedError


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs):
        server = start_http("127.0.0.1", 0, Backend(), None, 1 << 20, **kwargs)
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.stop()


def get(port: int, path: str = "/healthz") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def idle_connections(port: int, n: int) -> list[socket.socket]:
    """`n` connections that sent half a request line and then nothing."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /metr")
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_idle_connections_are_closed_after_the_timeout_and_health_still_answers(serve):
    port = serve(timeout=1.0)
    started = time.monotonic()
    socks = idle_connections(port, 50)
    assert get(port) == 200
    assert all(closed_by_server(sock) for sock in socks)
    assert time.monotonic() - started < 5


def test_connections_over_the_cap_get_a_fast_503(serve):
    port = serve(timeout=1.0, max_connections=3)
    socks = idle_connections(port, 3)
    time.sleep(0.2)  # let the server accept them
    started = time.monotonic()
    assert get(port) == 503
    assert time.monotonic() - started < 1
    assert all(closed_by_server(sock) for sock in socks)
    time.sleep(0.2)  # the handler threads release their slots
    assert get(port) == 200


def post_head(port: int, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /admin/snapshots HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (port, length))
    return sock


def status_line(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1024).split(b"\r\n", 1)[0]
    finally:
        sock.close()


def test_trickled_and_stalled_uploads_are_cut_off(serve):
    port = serve(timeout=1.0)
    sock = post_head(port, 1000)
    started = time.monotonic()
    while not select.select([sock], [], [], 0.1)[0]:  # one byte every 0.1 s: ~10 bytes/s
        sock.sendall(b"x")
        assert time.monotonic() - started < 5, "the server never cut the trickle off"
    assert b" 408 " in status_line(sock)

    sock = post_head(port, 1000)
    sock.sendall(b"x" * 10)
    assert b" 408 " in status_line(sock)  # stalled: the read times out

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/admin/snapshots", b"x" * 100_000, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 201 and b'"bytes": 100000' in response.read()
    conn.close()
