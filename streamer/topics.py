"""Broker reachability and topic creation with the admin client."""

from __future__ import annotations

import socket
import time
from typing import Any

import structlog
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = structlog.get_logger()

ADMIN_TIMEOUT_MS = 10_000


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """("host", port) pairs of a comma-separated bootstrap list ("h:9092,[::1]:9093")."""
    addresses = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bootstrap server {item.strip()!r} is not HOST:PORT")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def tcp_reachable(bootstrap: str, timeout: float = 0.5) -> bool:
    """True if any bootstrap server accepts a TCP connection (cheap: no Kafka request)."""
    for address in bootstrap_addresses(bootstrap):
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError:
            continue
        return True
    return False


def _admin(bootstrap: str, client: dict[str, Any]) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","),
        request_timeout_ms=ADMIN_TIMEOUT_MS,
        bootstrap_timeout_ms=ADMIN_TIMEOUT_MS,
        **client,
    )


def wait_for_broker(bootstrap: str, timeout: float, **client: Any) -> bool:
    """Wait until the broker accepts connections and answers a topic listing.

    The admin client is only built once the port accepts TCP connections: a client
    that fails to bootstrap leaves its IO thread behind in kafka-python 3.0.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tcp_reachable(bootstrap):
            try:
                admin = _admin(bootstrap, client)
                try:
                    admin.list_topics()
                    return True
                finally:
                    admin.close()
            except KafkaError as exc:
                log.debug("broker_not_ready", bootstrap=bootstrap, error=repr(exc))
        time.sleep(0.1)
    return False


def ensure_topic(
    bootstrap: str, name: str, partitions: int = 1, replication_factor: int = -1, **client: Any
) -> None:
    """Create topic `name` unless it exists (idempotent).

    replication_factor -1 takes the broker's default (KIP-464). An existing topic is
    left as it is; fewer partitions than asked is logged, not changed.
    """
    admin = _admin(bootstrap, client)
    try:
        admin.create_topics([NewTopic(name, partitions, replication_factor)])
        log.info("topic_created", topic=name, partitions=partitions)
    except TopicAlreadyExistsError:
        (described,) = admin.describe_topics([name])
        existing = len(described["partitions"])
        if existing < partitions:
            log.warning(
                "topic_has_fewer_partitions", topic=name, partitions=existing, wanted=partitions
            )
    finally:
        admin.close()
