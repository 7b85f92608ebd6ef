"""The embedded broker, topic creation and the client security options, on a real tansu."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from kafka import KafkaAdminClient
from pydantic import SecretStr

from streamer.broker import BrokerError, EmbeddedBroker, find_tansu, free_port
from streamer.kafka_client import client_config, redact
from streamer.topics import ensure_topic, tcp_reachable, wait_for_broker
from tests.kafka_fixtures import start_broker, unique_topic


def test_find_tansu_is_the_bundled_executable() -> None:
    path = find_tansu()
    assert path.name == "tansu"
    assert os.access(path, os.X_OK)


def test_broker_serves_then_stops() -> None:
    with start_broker() as running:
        assert tcp_reachable(running.bootstrap)
        assert wait_for_broker(running.bootstrap, timeout=5)
        bootstrap = running.bootstrap
    assert not tcp_reachable(bootstrap)
    assert not wait_for_broker(bootstrap, timeout=0.3)


def test_data_dir_receives_the_broker_log(tmp_path) -> None:
    with EmbeddedBroker(data_dir=tmp_path / "broker") as running:
        assert running.port is not None
    assert "tansu" in (tmp_path / "broker" / "broker.log").read_text()


def test_start_failure_reports_the_broker_output() -> None:
    with socket.socket() as taken:  # bound, not listening: tansu cannot bind, we cannot connect
        taken.bind(("127.0.0.1", 0))
        started = time.monotonic()
        with pytest.raises(BrokerError, match="exited with code") as failure:
            EmbeddedBroker(port=taken.getsockname()[1]).start()
    assert "in use" in str(failure.value).lower()
    assert time.monotonic() - started < 10


def test_ensure_topic_is_idempotent(broker) -> None:
    topic = unique_topic()
    ensure_topic(broker.bootstrap, topic, partitions=2)
    ensure_topic(broker.bootstrap, topic, partitions=2)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        (described,) = admin.describe_topics([topic])
    finally:
        admin.close()
    assert sorted(p["partition_index"] for p in described["partitions"]) == [0, 1]


def test_foreground_broker_exits_cleanly_on_sigterm() -> None:
    port = free_port()
    code = (
        f"import sys; from streamer.broker import run_foreground; sys.exit(run_foreground({port}))"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert wait_for_broker(f"127.0.0.1:{port}", timeout=20)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    assert not tcp_reachable(f"127.0.0.1:{port}")


def test_client_config_maps_security_settings() -> None:
    settings = {
        "security_protocol": "sasl_ssl",
        "sasl_mechanism": "scram-sha-512",
        "sasl_plain_username": "daemon",
        "sasl_plain_password": SecretStr("hunter2"),
        "ssl_cafile": "/etc/ca.pem",
        "ssl_certfile": None,
        "state_dir": "/var/lib/tailord",
    }
    config = client_config(settings)
    assert config == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "daemon",
        "sasl_plain_password": "hunter2",
        "ssl_cafile": "/etc/ca.pem",
    }
    assert redact(config)["sasl_plain_password"] == "***"
    assert redact(config)["sasl_plain_username"] == "daemon"
    assert client_config({}) == {}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"security_protocol": "TLS"}, "security_protocol"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "MD5"}, "sasl_mechanism"),
        ({"sasl_mechanism": "PLAIN"}, "security_protocol"),
    ],
)
def test_client_config_rejects_bad_settings(settings: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        client_config(settings)
