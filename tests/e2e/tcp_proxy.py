"""Loopback network plumbing for outage and TLS tests: a breakable TCP proxy and a tansu broker
that advertises another address than the one it listens on.

Kafka clients connect to the bootstrap address once, then to the address the broker
*advertises* in its metadata. To put a proxy (or a TLS tunnel) between a client and the
broker, the broker must advertise the proxy's address: `AdvertisingBroker` does that.

`TcpProxy` forwards 127.0.0.1:port to an upstream address and can break the path:
`cut()` resets every connection and closes the listening socket (new connections are
refused), `stall()` keeps connections open but forwards nothing (half-open: a frozen
broker or a black-holed network), `restore()` heals both. Connections whose first Kafka
request carries `bypass_client_id` are never cut or stalled: a test producer made before
the outage keeps writing to the broker while the daemon behind the proxy is cut off.
Everything stops by itself after `lifetime_s`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from streamer.broker import STORAGE_URL, find_tansu, free_port

POLL_S = 0.2  # how often idle threads look at the proxy's state
CHUNK = 64 * 1024


def kafka_client_id(request: bytes) -> str | None:
    """The client id in the header of the Kafka request at the start of `request`, or None.

    Request header v1/v2: int32 size, int16 api key, int16 api version, int32 correlation
    id, then the client id as an int16-length string (non-compact even in flexible v2).
    """
    if len(request) < 14:
        return None
    (length,) = struct.unpack_from(">h", request, 12)
    if length < 0 or len(request) < 14 + length:
        return None
    return request[14 : 14 + length].decode("utf-8", "replace")


class _Link:
    """One proxied connection: the accepted client socket and its upstream socket."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.bypass = False  # decided by the first request from the client
        self.closed = False

    def close(self, reset: bool = False) -> None:
        """Close both sockets; `reset` sends RST instead of FIN (an abrupt failure)."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """A loopback TCP proxy to `upstream` with `cut`, `stall` and `restore`."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None, *,
                 bypass_client_id: str | None = None, lifetime_s: float = 600.0) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self.bypass_client_id = bypass_client_id
        self.lifetime_s = lifetime_s
        self.state = "open"  # open | cut | stalled | closed
        self._cond = threading.Condition()
        self._links: list[_Link] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._deadline = 0.0

    @property
    def address(self) -> str:
        """HOST:PORT clients use."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        """Listen and start forwarding; `close()` runs by itself after `lifetime_s`."""
        self._deadline = time.monotonic() + self.lifetime_s
        self._listen()
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def cut(self) -> None:
        """Reset every connection (bypass ones excepted) and refuse new ones."""
        with self._cond:
            self.state = "cut"
            self._close_listener()
            for link in self._links:
                if not link.bypass:
                    link.close(reset=True)
            self._cond.notify_all()

    def stall(self) -> None:
        """Accept and keep connections, but forward nothing (bypass ones excepted)."""
        with self._cond:
            self.state = "stalled"
            if self._listener is None:
                self._listen()
            self._cond.notify_all()

    def restore(self) -> None:
        """Forward again; after a cut, accept connections again on the same port."""
        with self._cond:
            self.state = "open"
            if self._listener is None:
                self._listen()
            self._cond.notify_all()

    def close(self) -> None:
        """Stop for good: close the listener and every connection."""
        with self._cond:
            self.state = "closed"
            self._close_listener()
            for link in self._links:
                link.close()
            self._cond.notify_all()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    # ---- internals
    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(POLL_S)
        self._listener = listener

    def _close_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
            self._listener.close()
            self._listener = None

    def _expired(self) -> bool:
        if self.state != "closed" and time.monotonic() > self._deadline:
            self.close()
        return self.state == "closed"

    def _accept_loop(self) -> None:
        while not self._expired():
            listener = self._listener
            if listener is None:
                time.sleep(POLL_S)
                continue
            try:
                client, _ = listener.accept()
            except OSError:  # timeout, or the listener was closed by cut()
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            link = _Link(client, upstream)
            with self._cond:
                if self.state in ("cut", "closed"):
                    link.close(reset=True)
                    continue
                self._links = [x for x in self._links if not x.closed] + [link]
            self._spawn(self._pump, "proxy-up", link, client, upstream, True)
            self._spawn(self._pump, "proxy-down", link, upstream, client, False)

    def _hold(self, link: _Link) -> None:
        """Block while the proxy is stalled (unless `link` bypasses it or is closed)."""
        with self._cond:
            while self.state == "stalled" and not link.bypass and not link.closed:
                self._cond.wait(POLL_S)

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        """Copy src to dst until either side closes; hold the data while stalled."""
        first = from_client
        try:
            while not link.closed and not self._expired():
                self._hold(link)
                if link.closed or not select.select([src], [], [], POLL_S)[0]:
                    continue
                data = src.recv(CHUNK)
                if not data:
                    break
                if first:
                    first = False
                    cid = kafka_client_id(data)
                    link.bypass = self.bypass_client_id is not None and cid == self.bypass_client_id
                self._hold(link)
                if link.closed:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket closed by cut()
            pass
        link.close()


class AdvertisingBroker:
    """A tansu broker listening on a free loopback port, advertising `advertised` (HOST:PORT).

    `streamer.broker.EmbeddedBroker` advertises its own port; here clients are sent to
    another address (a `TcpProxy`, a TLS tunnel), so readiness is a TCP check of the
    broker's own port, not a Kafka round trip (which would go through that address).
    """

    def __init__(self, advertised: str, log_path: Path) -> None:
        self.port = free_port()
        self.advertised = advertised
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The broker's own listening address (plaintext Kafka)."""
        return ("127.0.0.1", self.port)

    def start(self, timeout: float = 30.0) -> AdvertisingBroker:
        """Start tansu and wait until its port accepts connections."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        command = [str(find_tansu()), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                   "--advertised-listener-url", f"tcp://{self.advertised}", "--storage-engine", STORAGE_URL]
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                socket.create_connection(self.address, timeout=0.5).close()
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tansu on port {self.port} did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Terminate tansu (SIGKILL after 10 s)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> AdvertisingBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
