"""Broker outages end to end: the real daemon reaches a real broker only through a TcpProxy.

Two failures, one test each: a hard cut (connections reset, new ones refused) for 60 s,
and a half-open stall (connections accepted but nothing forwarded) for longer than the
consumer's 30 s request timeout. During each, a producer that bypasses the proxy keeps
writing to the broker. The daemon must stay alive (/healthz 200) and idle (CPU well under
a core: no busy reconnect loop), say it is not ready while the broker is unreachable,
reconnect by itself once the path heals, and then train every record exactly once: none
skipped (the audit log lists them all), none retrained (no seek back).
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaProducer

from streamer.sources.builtin import digits
from streamer.topics import ensure_topic
from tests.e2e.daemon_proc import DaemonProcess, free_port
from tests.e2e.streams import metric
from tests.e2e.tcp_proxy import AdvertisingBroker, TcpProxy
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BYPASS_CLIENT_ID = "tailord-test-bypass"
PHASE_RECORDS = 48
CUT_S = 60.0
STALL_S = 35.0  # past the consumer's request_timeout_ms (30 s): it must notice and reconnect
MAX_CPU_SHARE = 0.20  # of one core, averaged over the outage
RECOVER_S = 60.0
SETTINGS = dict(batch_size=16, probe_fraction=0, experience_images=100_000, checkpoint_interval_s=3600,
                audit_trained_ids="true")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class OutageRig:
    """Broker, proxy, a bypassing producer and the daemon behind the proxy."""

    proxy: TcpProxy
    producer: KafkaProducer
    daemon: DaemonProcess
    topic: str
    sent: list[str]

    def send(self, phase: str) -> None:
        """Produce PHASE_RECORDS digit images with ids `<phase>/<key>`; fail if one is refused."""
        items = itertools.islice(digits(), PHASE_RECORDS)
        futures = []
        for item in items:
            sample_id = f"{phase}/{item.key}"
            futures.append(self.producer.send(self.topic, value=item.encoded, headers=[
                ("sample-id", sample_id.encode()), ("domain", b"outage")]))
            self.sent.append(sample_id)
        self.producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=1)

    def trained(self) -> int:
        """Images the daemon has trained so far (0 when the admin API does not answer)."""
        return self.daemon.status().get("images_total", 0)

    def wait_trained(self, timeout: float, what: str) -> None:
        """Wait until everything sent so far is trained."""
        self.daemon.wait_for(lambda: self.trained() >= len(self.sent), timeout, what)

    def watch(self, seconds: float, expect_ready: bool | None) -> float:
        """Watch the daemon for `seconds`: alive, /healthz 200, no training; its CPU share of one core.

        With `expect_ready` set, /readyz must answer accordingly the whole time.
        """
        pid = self.daemon.proc.pid
        trained = self.trained()
        start_cpu, start = cpu_seconds(pid), time.monotonic()
        while time.monotonic() - start < seconds:
            assert self.daemon.proc.poll() is None, f"daemon died during the outage:\n{self.daemon.tail()}"
            assert self.daemon.get("/healthz")[0] == 200
            if expect_ready is not None:
                assert (self.daemon.get("/readyz")[0] == 200) is expect_ready
            time.sleep(2.0)
        share = (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)
        assert self.trained() == trained, "records reached the daemon through a broken proxy"
        return share

    def check_every_record_trained_once(self) -> None:
        """The audit log holds each sent id exactly once; the daemon stops cleanly."""
        assert self.daemon.stop(signal.SIGTERM) == 0
        trained = (self.daemon.state_dir / "metrics" / "trained_ids.log").read_text().split()
        assert sorted(trained) == sorted(self.sent), (
            f"skipped: {sorted(set(self.sent) - set(trained))[:5]}, "
            f"retrained: {sorted(i for i in set(trained) if trained.count(i) > 1)[:5]}")
        assert not [e for e in self.daemon.logs() if e.get("event") == "daemon_failed"]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[OutageRig]:
    """A broker advertising a proxy, the daemon bootstrapping through it, some data trained."""
    proxy_port = free_port()
    broker = AdvertisingBroker(f"127.0.0.1:{proxy_port}", tmp_path / "broker.log")
    with broker, TcpProxy(broker.address, proxy_port, bypass_client_id=BYPASS_CLIENT_ID,
                          lifetime_s=240) as proxy:
        topic = unique_topic("outage")
        ensure_topic(proxy.address, topic)
        producer = KafkaProducer(bootstrap_servers=proxy.address, client_id=BYPASS_CLIENT_ID,
                                 connections_max_idle_ms=600_000)
        daemon = DaemonProcess(tmp_path / "state", proxy.address, topic, **SETTINGS)
        rig = OutageRig(proxy, producer, daemon, topic, [])
        try:
            rig.send("before")  # also opens the producer's connection, which outages spare
            daemon.start()
            rig.wait_trained(90, "the first records trained")
            assert daemon.get("/readyz")[0] == 200
            yield rig
        finally:
            daemon.kill()
            producer.close(timeout=5)


def test_cut_for_a_minute_then_reconnect_without_skipping(rig: OutageRig) -> None:
    rig.proxy.cut()
    rig.send("during-cut")
    rig.daemon.wait_for(lambda: rig.daemon.get("/readyz")[0] == 503, 5, "/readyz 503 once the broker is cut")
    assert metric(rig.daemon.metrics(), "tailord_broker_up") == 0
    share = rig.watch(CUT_S, expect_ready=False)
    print(f"daemon CPU during a {CUT_S:.0f} s cut: {share:.1%} of one core")
    assert share < MAX_CPU_SHARE, f"the daemon used {share:.0%} of a core while the broker was cut"

    rig.proxy.restore()
    rig.wait_trained(RECOVER_S, "the records produced during the cut trained after restore")
    assert rig.daemon.get("/readyz")[0] == 200
    assert metric(rig.daemon.metrics(), "tailord_broker_up") == 1
    rig.send("after-cut")
    rig.wait_trained(RECOVER_S, "new records trained after the cut")
    rig.check_every_record_trained_once()


def test_half_open_stall_then_reconnect_without_skipping(rig: OutageRig) -> None:
    rig.proxy.stall()
    rig.send("during-stall")
    # a half-open path passes a TCP check; readiness also wants a broker round trip in the last 30 s
    share = rig.watch(STALL_S, expect_ready=None)
    print(f"daemon CPU during a {STALL_S:.0f} s stall: {share:.1%} of one core")
    assert share < MAX_CPU_SHARE, f"the daemon used {share:.0%} of a core while the broker stalled"
    assert rig.daemon.get("/readyz")[0] == 503, "a stalled broker must make the daemon unready"

    rig.proxy.restore()
    rig.wait_trained(RECOVER_S, "the records produced during the stall trained after restore")
    rig.send("after-stall")
    rig.wait_trained(RECOVER_S, "new records trained after the stall")
    rig.check_every_record_trained_once()
