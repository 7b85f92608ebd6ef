"""Kafka over TLS end to end: every client of the daemon (consumer, DLQ producer, admin) speaks SSL.

tansu has no TLS listener here, so stunnel4 terminates TLS in front of it: a test CA signs
a certificate for 127.0.0.1, stunnel accepts TLS on one port and forwards plaintext to the
broker, which advertises the TLS port (so clients never learn the plaintext one). The
daemon runs with TAILORD_KAFKA_SECURITY_PROTOCOL=SSL and the CA file; images are produced
with `streamer.produce` over TLS too. It must train every image and dead-letter a bad
record through TLS; a plaintext client, or a TLS client not trusting the test CA, must not
get through.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from streamer.produce import produce
from streamer.sources.builtin import digits
from tests.e2e.daemon_proc import DaemonProcess, free_port
from tests.e2e.streams import metric
from tests.e2e.tcp_proxy import AdvertisingBroker
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("stunnel4") and shutil.which("openssl")),
                                 reason="needs stunnel4 and openssl (make data)")]

IMAGES = 64


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for IP 127.0.0.1 it signs: (ca.pem, server.pem, server.key)."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                       "server.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=tailord test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", folder / "server.ext"],
    ]
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    for command in commands:
        subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=30)
    return ca, cert, key


class Stunnel:
    """stunnel4 in server mode: TLS on 127.0.0.1:`port`, plaintext to `upstream`."""

    def __init__(self, folder: Path, upstream: tuple[str, int], cert: Path, key: Path, port: int) -> None:
        self.port = port
        self.config = folder / "stunnel.conf"
        self.log_path = folder / "stunnel.log"
        self.config.write_text(f"foreground = yes\npid =\ndebug = notice\noutput = {self.log_path}\n"
                               f"[kafka]\naccept = 127.0.0.1:{port}\nconnect = {upstream[0]}:{upstream[1]}\n"
                               f"cert = {cert}\nkey = {key}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Stunnel:
        self.proc = subprocess.Popen(["stunnel4", str(self.config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        log = self.log_path.read_text() if self.log_path.exists() else ""
        raise RuntimeError(f"stunnel4 did not listen on {self.port}: {log[-2000:]}")

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(TLS bootstrap address, CA file) of a tansu broker behind stunnel4."""
    ca, cert, key = make_certificates(tmp_path)
    tls_port = free_port()
    with AdvertisingBroker(f"127.0.0.1:{tls_port}", tmp_path / "broker.log") as broker, \
            Stunnel(tmp_path, broker.address, cert, key, tls_port):
        yield f"127.0.0.1:{tls_port}", ca


def test_daemon_trains_and_dead_letters_over_tls(tls_broker: tuple[str, Path], tmp_path: Path) -> None:
    bootstrap, ca = tls_broker
    ssl = {"security_protocol": "SSL", "ssl_cafile": str(ca)}
    topic = unique_topic("tls")
    assert produce("builtin:digits", topic=topic, bootstrap=bootstrap, limit=IMAGES, client=ssl) == IMAGES
    producer = KafkaProducer(bootstrap_servers=bootstrap, **ssl)
    producer.send(topic, value=b"plain text, not an image", headers=[("sample-id", b"tls-bad")]).get(timeout=30)
    producer.close(timeout=10)

    daemon = DaemonProcess(tmp_path / "state", bootstrap, topic, kafka_security_protocol="SSL",
                           kafka_ssl_cafile=ca, batch_size=16, probe_fraction=0, audit_trained_ids="true",
                           experience_images=100_000, checkpoint_interval_s=3600).start()
    try:
        daemon.wait_for(lambda: daemon.status().get("images_total", 0) >= IMAGES, 120, "the TLS stream trained")
        daemon.wait_for(lambda: metric(daemon.metrics(), "tailord_records_rejected_total") == 1, 30,
                        "the bad record rejected")
        assert daemon.get("/readyz")[0] == 200
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    trained = (daemon.state_dir / "metrics" / "trained_ids.log").read_text().split()
    assert sorted(trained) == sorted(f"digits/{item.key}" for item in itertools.islice(digits(), IMAGES))

    dlq = KafkaConsumer(f"{topic}.dlq", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                        consumer_timeout_ms=5000, **ssl)
    dead = [dict(m.headers) for m in dlq]
    dlq.close()
    assert [(h["sample-id"], h["reject-reason"]) for h in dead] == [(b"tls-bad", b"unknown_format")]


@pytest.mark.parametrize("client", [{}, {"security_protocol": "SSL"}], ids=["plaintext", "untrusted-ca"])
def test_clients_without_tls_or_trust_are_refused(tls_broker: tuple[str, Path], client: dict) -> None:
    bootstrap, _ = tls_broker
    with pytest.raises(KafkaError):
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=3000,
                                 request_timeout_ms=3000, **client)
        try:
            admin.list_topics()
        finally:
            admin.close()
