"""The one HTTP server: /metrics, /healthz, /readyz and the token-protected /admin/* API.

The server knows nothing of training: it calls the `AdminBackend` it is given.

Idle and slow clients cannot pile up: every socket read times out after `timeout` seconds,
an upload must arrive at `MIN_UPLOAD_BYTES_PER_S` or better (after one `timeout` of grace),
and at most `max_connections` connections are served at once; one more is answered 503
and closed without taking a thread.
"""

from __future__ import annotations

import hmac
import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

log = structlog.get_logger()

TIMEOUT_S = 20.0
"""Seconds one socket read may wait (an idle or stalled client is dropped after it)."""
MAX_CONNECTIONS = 64
"""Connections served at once; each holds a thread."""
MIN_UPLOAD_BYTES_PER_S = 64 * 1024
"""Slowest upload accepted: its body must arrive within TIMEOUT_S + length / this rate."""
_BUSY_BODY = b'{"error": "too many open connections"}\n'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class ApiError(Exception):
    """An error answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminBackend(Protocol):
    """What the daemon offers the HTTP server."""

    def metrics_text(self) -> bytes: ...
    def ready(self) -> tuple[bool, dict[str, Any]]: ...
    def status(self) -> dict[str, Any]: ...
    def create_snapshot(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]: ...
    def get_snapshot(self, name: str) -> dict[str, Any]: ...
    def snapshot_file(self, name: str, filename: str) -> Path: ...


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer serving at most `max_connections` connections at once."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog (socketserver's 5 makes a burst of clients wait seconds)

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 without reading the request, on the accepting thread (never blocks long)."""
        try:
            request.settimeout(0.5)
            request.sendall(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)


@dataclass
class HttpServer:
    """A running server; `port` is the bound port (useful with port 0)."""

    server: _BoundedHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_http(host: str, port: int, backend: AdminBackend, admin_token: str | None,
               upload_max_bytes: int, timeout: float = TIMEOUT_S,
               max_connections: int = MAX_CONNECTIONS) -> HttpServer:
    """Bind and serve in a daemon thread (socket reads time out after `timeout` seconds)."""
    handler = _make_handler(backend, admin_token, upload_max_bytes, timeout)
    server = _BoundedHTTPServer((host, port), handler, max_connections)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return HttpServer(server, thread)


def _make_handler(backend: AdminBackend, admin_token: str | None, upload_max_bytes: int,
                  read_timeout: float) -> type:
    token = admin_token.encode() if admin_token else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "tailord"
        timeout = read_timeout  # StreamRequestHandler sets it on the socket

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            # a client that timed out before its request line has no `requestline` yet
            log.debug("http", request=getattr(self, "requestline", None), code=args[1] if len(args) > 1 else None)

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send_file(self, path: Path) -> None:
            with open(path, "rb") as fh:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(path.stat().st_size))
                self.end_headers()
                shutil.copyfileobj(fh, self.wfile)

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload, indent=2, default=str).encode() + b"\n")

        def _authorized(self) -> bool:
            if token is None:
                return True
            got = self.headers.get("Authorization", "")
            expected = b"Bearer " + token
            return hmac.compare_digest(got.encode("utf-8", "replace"), expected)

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if method == "GET" and path == "/metrics":
                    return self._send(200, backend.metrics_text(), CONTENT_TYPE_LATEST)
                if method == "GET" and path == "/healthz":
                    return self._json(200, {"status": "alive"})
                if method == "GET" and path == "/readyz":
                    ok, detail = backend.ready()
                    return self._json(200 if ok else 503, {"ready": ok, **detail})
                if path.startswith("/admin/"):
                    if not self._authorized():
                        return self._json(401, {"error": "missing or wrong bearer token"})
                    return self._admin(method, path)
                raise ApiError(404, f"no route {method} {path}")
            except ApiError as exc:
                self._json(exc.status, {"error": exc.message})
            except Exception as exc:  # a bug must not kill the server thread
                log.exception("http_error", path=path)
                self._json(500, {"error": f"internal error: {type(exc).__name__}"})

        def _admin(self, method: str, path: str) -> None:
            if method == "GET" and path == "/admin/status":
                return self._json(200, backend.status())
            if method == "POST" and path == "/admin/snapshots":
                declared = (self.headers.get("Content-Length") or "0").strip()
                if not (declared.isascii() and declared.isdigit()):  # "-1" would read until EOF
                    raise ApiError(400, f"bad Content-Length {declared[:20]!r}")
                length = int(declared)
                if length > upload_max_bytes:
                    raise ApiError(413, f"upload of {length} bytes is over the limit of {upload_max_bytes}")
                body = self._read_body(length)
                status, payload = backend.create_snapshot(self.headers.get("Content-Type", ""), body)
                return self._json(status, payload)
            if method == "GET" and path.startswith("/admin/snapshots/"):
                name, _, filename = path.removeprefix("/admin/snapshots/").partition("/")
                if filename:
                    return self._send_file(backend.snapshot_file(name, filename))
                return self._json(200, backend.get_snapshot(name))
            raise ApiError(404, f"no route {method} {path}")

        def _read_body(self, length: int) -> bytes:
            """`length` body bytes, read within `read_timeout` + length / MIN_UPLOAD_BYTES_PER_S."""
            deadline = time.monotonic() + read_timeout + length / MIN_UPLOAD_BYTES_PER_S
            chunks, remaining = [], length
            while remaining:
                chunk = self._read_chunk(min(remaining, 1 << 16), deadline)
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)

        def _read_chunk(self, most: int, deadline: float) -> bytes:
            """Up to `most` body bytes from one socket read; ApiError if the client stalls, is too
            slow or stops early (the connection is then closed: the rest of the body is unread)."""
            try:
                chunk = self.rfile.read1(most)
            except TimeoutError:
                chunk = None
            if chunk and time.monotonic() <= deadline:
                return chunk
            self.close_connection = True
            if chunk == b"":
                raise ApiError(400, "the body ended before Content-Length bytes")
            raise ApiError(408, f"upload stalled or slower than {MIN_UPLOAD_BYTES_PER_S} bytes/s")

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            self._dispatch("POST")

    return Handler
