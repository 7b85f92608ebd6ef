"""Runs the real daemon (`python -m deploy.cli run`) as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DaemonProcess:
    """One daemon process with its own state dir, HTTP port and log file."""

    def __init__(self, state_dir: Path, bootstrap: str | None, topic: str, **settings: object) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.token = "test-token"
        self.log_path = state_dir.parent / f"{state_dir.name}-daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAILORD_")}
        env.update({"TAILORD_STATE_DIR": str(state_dir), "TAILORD_TOPIC": topic,
                    "TAILORD_HTTP_PORT": str(self.port), "TAILORD_ADMIN_TOKEN": self.token,
                    "TAILORD_LOG_FORMAT": "json", "TAILORD_PRESET": "cpu", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1"})
        if bootstrap:
            env["TAILORD_BOOTSTRAP_SERVERS"] = bootstrap
        env.update({f"TAILORD_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 90) -> DaemonProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self.get("/healthz")[0] == 200, wait, "daemon /healthz")
        return self

    def get(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def status(self) -> dict:
        code, body = self.get("/admin/status", self.token)
        return json.loads(body) if code == 200 else {}

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}")
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
