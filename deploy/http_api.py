"""The one HTTP server: /metrics, /healthz, /readyz and the token-protected /admin/* API.

The server knows nothing of training: it calls the `AdminBackend` it is given.

Browsers are kept out of the admin API: every route but /healthz, /readyz and /metrics
answers 403 unless the `Host` header names the server (`HostPolicy`: on a loopback bind
only localhost, 127.0.0.1 or [::1] with the bound port, so a DNS-rebound page cannot read
it), and /admin/* also refuses a request whose `Origin` header names another site (a
cross-origin form POST). The daemon always has a token: without TAILORD_ADMIN_TOKEN it
writes a fresh one to `<state>/admin.token` (`write_token_file`, mode 0600).

Idle and slow clients cannot pile up: every socket read times out after `timeout` seconds,
an upload must arrive at `MIN_UPLOAD_BYTES_PER_S` or better (after one `timeout` of grace),
and at most `max_connections` connections are served at once; one more is answered 503
and closed without taking a thread.
"""

from __future__ import annotations

import hmac
import json
import secrets
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from deploy.snapshot_errors import (
    BadRequest,
    Conflict,
    NotFound,
    SnapshotError,
    Unavailable,
    UnsupportedBody,
)
from deploy.status_page import PAGE_CONTENT_TYPE, PAGE_HEADERS
from safefiles.files import write_exclusive

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


TOKEN_FILE = "admin.token"
"""In the state dir: the token the daemon generated because none was configured."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Answered whatever the Host header says (probes and scrapers address the daemon in many ways)."""


def write_token_file(state_dir: Path) -> tuple[str, Path]:
    """A fresh random admin token written to `<state_dir>/admin.token` (mode 0600); (token, path).

    Written with `safefiles.files.write_exclusive` (a planted file or symlink is never
    written through; the old file is replaced by a rename).
    """
    token = secrets.token_urlsafe(32)
    path = Path(state_dir) / TOKEN_FILE
    write_exclusive(path, (token + "\n").encode(), mode=0o600)
    return token, path


def read_token_file(path: Path) -> str | None:
    """The token in a token file (surrounding whitespace stripped); None if it is missing or empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return token or None


def split_host(value: str) -> tuple[str, int | None] | None:
    """`host[:port]` (IPv6 in brackets) as (lower-case name, port or None); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif value.count(":") > 1:
        return None  # a bare IPv6 address: not a valid Host
    else:
        name, _, port = value.partition(":")
        port = port if ":" in value else None
    name = name.rstrip(".")
    if not name or any(c in name for c in "/@?#\\ "):
        return None
    if port is None:
        return name, None
    if not (port.isascii() and port.isdigit()) or len(port) > 5:
        return None
    return name, int(port)


@dataclass(frozen=True)
class HostPolicy:
    """Which `Host` (and `Origin`) values the server answers to, against DNS rebinding.

    A loopback bind answers localhost, 127.0.0.1 and [::1] on its port; a bind to one
    address answers that address on its port; a wildcard bind (0.0.0.0, ::) answers any
    name and port unless `allowed` is given. `allowed` (TAILORD_HTTP_ALLOWED_HOSTS) adds names a
    proxy uses: `name` (any port), `name:port`, or `*` (anything).
    """

    bind_host: str
    port: int
    allowed: tuple[str, ...] = ()

    @classmethod
    def of(cls, bind_host: str, port: int, allowed: Iterable[str] | str | None) -> HostPolicy:
        if isinstance(allowed, str):
            allowed = allowed.split(",")
        entries = tuple(entry.strip().lower() for entry in (allowed or ()) if entry.strip())
        for entry in entries:
            if entry != "*" and split_host(entry) is None:
                raise ValueError(f"bad allowed host {entry!r}: use name, name:port, [v6]:port or *")
        return cls(bind_host.strip().lower().strip("[]"), port, entries)

    def allows(self, host: str | None, default_port: int = 80) -> bool:
        """Whether a request's `Host` value names this server (None: no header, not a browser)."""
        if host is None:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        port = default_port if port is None else port
        for entry in self.allowed:
            if entry == "*":
                return True
            allowed_name, allowed_port = split_host(entry)  # type: ignore[misc] - checked in of()
            if name == allowed_name and allowed_port in (None, port):
                return True
        if self.bind_host in WILDCARD_HOSTS and not self.allowed:
            return True  # reached under any name, and through published or forwarded ports
        if port != self.port:
            return False
        if self.bind_host in LOOPBACK_NAMES or self.bind_host in WILDCARD_HOSTS:
            return name in LOOPBACK_NAMES
        return name == self.bind_host

    def allows_origin(self, origin: str | None) -> bool:
        """Whether a browser's `Origin` names this server (no header: not a cross-site browser request)."""
        if origin is None:
            return True
        parsed = urllib.parse.urlsplit(origin.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
            return False  # "null" (sandboxed frames, file://) included
        return self.allows(parsed.netloc, 443 if parsed.scheme == "https" else 80)


class ApiError(Exception):
    """An error of the HTTP exchange itself, answered as JSON with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


ERROR_STATUS: dict[type[SnapshotError], int] = {
    BadRequest: 400, NotFound: 404, Conflict: 409, UnsupportedBody: 415, Unavailable: 503,
}
"""The one mapping from the snapshot domain's errors (deploy/snapshot_errors.py) to HTTP statuses."""


def error_status(error: SnapshotError) -> int:
    """The HTTP status a domain error is answered with (500 for a kind not in ERROR_STATUS)."""
    return next((status for kind, status in ERROR_STATUS.items() if isinstance(error, kind)), 500)


class AdminBackend(Protocol):
    """What the daemon offers the HTTP server."""

    def metrics_text(self) -> bytes: ...
    def ready(self) -> tuple[bool, dict[str, Any]]: ...
    def status(self) -> dict[str, Any]: ...
    def create_snapshot(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]: ...
    def get_snapshot(self, name: str) -> dict[str, Any]: ...
    def snapshot_file(self, name: str, filename: str) -> Path: ...
    def status_page(self) -> bytes: ...


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
               max_connections: int = MAX_CONNECTIONS, *,
               allowed_hosts: Iterable[str] | str | None = None, metrics_auth: bool = False) -> HttpServer:
    """Bind and serve in a daemon thread (socket reads time out after `timeout` seconds).

    `admin_token` None leaves /admin/* without a token (the daemon never does that unless
    told to with an empty TAILORD_ADMIN_TOKEN); the Host/Origin checks apply regardless.
    `metrics_auth` puts /metrics behind the same bearer token (/healthz and /readyz stay open).
    """
    handler = type("BoundAdminHandler", (AdminHandler,), {
        "backend": backend, "token": admin_token.encode() if admin_token else None,
        "upload_max_bytes": upload_max_bytes, "timeout": timeout, "metrics_auth": metrics_auth})
    server = _BoundedHTTPServer((host, port), handler, max_connections)
    handler.policy = HostPolicy.of(host, server.server_address[1], allowed_hosts)  # the bound port
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return HttpServer(server, thread)


class AdminHandler(BaseHTTPRequestHandler):
    """One request: the Host/Origin/token checks, then a route. `start_http` binds the class
    attributes below in a subclass, one per server."""

    server_version = "tailord"
    backend: AdminBackend
    token: bytes | None
    upload_max_bytes: int
    metrics_auth: bool
    policy: HostPolicy
    timeout: float  # StreamRequestHandler sets it on the socket

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # a client that timed out before its request line has no `requestline` yet
        log.debug("http", request=getattr(self, "requestline", None), code=args[1] if len(args) > 1 else None)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path not in OPEN_PATHS and not self.policy.allows(self.headers.get("Host")):
                self.close_connection = True
                return self._json(403, {"error": "unknown Host header: not this server's name "
                                                 "(TAILORD_HTTP_ALLOWED_HOSTS adds names a proxy uses)"})
            if method == "GET" and path in ("/", "/metrics", "/healthz", "/readyz"):
                return self._open_get(path)
            if path.startswith("/admin/"):
                return self._guarded_admin(method, path)
            raise ApiError(404, f"no route {method} {path}")
        except ApiError as exc:
            self._json(exc.status, {"error": exc.message})
        except SnapshotError as exc:
            self._json(error_status(exc), {"error": exc.message})
        except Exception as exc:  # a bug must not kill the server thread
            log.exception("http_error", path=path)
            self._json(500, {"error": f"internal error: {type(exc).__name__}"})

    def _open_get(self, path: str) -> None:
        """The status page and /metrics (behind the token with TAILORD_METRICS_AUTH), the probes."""
        if path in ("/", "/metrics") and self.metrics_auth and not self._authorized():
            return self._json(401, {"error": "missing or wrong bearer token (TAILORD_METRICS_AUTH)"})
        if path == "/":  # the status page (deploy/status_page.py)
            return self._send(200, self.backend.status_page(), PAGE_CONTENT_TYPE, PAGE_HEADERS)
        if path == "/metrics":
            return self._send(200, self.backend.metrics_text(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return self._json(200, {"status": "alive"})
        ok, detail = self.backend.ready()
        return self._json(200 if ok else 503, {"ready": ok, **detail})

    def _guarded_admin(self, method: str, path: str) -> None:
        if not self.policy.allows_origin(self.headers.get("Origin")):
            self.close_connection = True
            return self._json(403, {"error": "cross-origin request refused"})
        if not self._authorized():
            self.close_connection = True  # a POST body stays unread
            return self._json(401, {"error": "missing or wrong bearer token"})
        return self._admin(method, path)

    def _admin(self, method: str, path: str) -> None:
        if method == "GET" and path == "/admin/status":
            return self._json(200, self.backend.status())
        if method == "POST" and path == "/admin/snapshots":
            body = self._read_body(self._content_length())
            status, payload = self.backend.create_snapshot(self.headers.get("Content-Type", ""), body)
            return self._json(status, payload)
        if method == "GET" and path.startswith("/admin/snapshots/"):
            name, _, filename = path.removeprefix("/admin/snapshots/").partition("/")
            if filename:
                return self._send_file(self.backend.snapshot_file(name, filename))
            return self._json(200, self.backend.get_snapshot(name))
        raise ApiError(404, f"no route {method} {path}")

    def _authorized(self) -> bool:
        if self.token is None:
            return True
        got = self.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode("utf-8", "replace"), b"Bearer " + self.token)

    def _content_length(self) -> int:
        """The declared body size, refused before reading when malformed or over the upload limit."""
        declared = (self.headers.get("Content-Length") or "0").strip()
        if not (declared.isascii() and declared.isdigit()):  # "-1" would read until EOF
            raise ApiError(400, f"bad Content-Length {declared[:20]!r}")
        length = int(declared)
        if length > self.upload_max_bytes:
            raise ApiError(413, f"upload of {length} bytes is over the limit of {self.upload_max_bytes}")
        return length

    def _read_body(self, length: int) -> bytes:
        """`length` body bytes, read within `timeout` + length / MIN_UPLOAD_BYTES_PER_S."""
        deadline = time.monotonic() + self.timeout + length / MIN_UPLOAD_BYTES_PER_S
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

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
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
