"""Dead-letter queue: a rejected record goes, as it came, to `<topic>.dlq` with the reason.

The DLQ record keeps the original key, value and headers and adds:
`reject-reason` (a stable label from `streamer.decode.REASONS`), `reject-detail` (for
humans, at most 512 bytes), `source-partition`, `source-offset` and `source-value-bytes`
(the original value's length). A value longer than `max_value_bytes` is replaced by b""
(the headers still say what it was), so an oversized record cannot also fail the DLQ.

Caller safety: the DLQ is the path taken when something already went wrong, so it never
raises a Kafka error into the consume loop. `send` returns the producer's future, or None
when the record could not even be queued; every failure, immediate or later on the
producer's I/O thread, is logged and counted in `failures`. `flush` says whether nothing
is left pending.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from streamer.records import RawRecord

DETAIL_MAX_BYTES = 512
"""Longest `reject-detail` header value."""

DEFAULT_MAX_VALUE_BYTES = 900_000
"""Largest value forwarded as is: under the broker's default 1 MB `message.max.bytes`."""

_ADDED_HEADERS = frozenset(
    {"reject-reason", "reject-detail", "source-partition", "source-offset", "source-value-bytes"}
)

log = structlog.get_logger()


def dlq_topic(topic: str) -> str:
    """The dead-letter topic of `topic`."""
    return f"{topic}.dlq"


class DeadLetterQueue:
    """Publishes rejected records to their topic's DLQ through one `KafkaProducer`."""

    def __init__(
        self, producer: KafkaProducer, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    ) -> None:
        self._producer = producer
        self._max_value_bytes = max_value_bytes
        self._failures = 0
        self._lock = threading.Lock()  # failures are counted from the producer's thread too

    @classmethod
    def connect(
        cls, bootstrap: str | list[str], client_config: dict[str, Any] | None = None
    ) -> DeadLetterQueue:
        """A DLQ with its own producer (acks=all unless `client_config` says otherwise).

        `client_config` is `streamer.kafka_client.client_config(...)` (security options).
        Raises kafka's `NoBrokersAvailable` if the brokers cannot be reached: this happens
        at start-up, not in the consume loop.
        """
        config = {"acks": "all", **(client_config or {})}
        return cls(KafkaProducer(bootstrap_servers=bootstrap, **config))

    @property
    def failures(self) -> int:
        """DLQ records that could not be queued or delivered since this DLQ was made."""
        with self._lock:
            return self._failures

    def send(self, record: RawRecord, reason: str, detail: str = "") -> FutureRecordMetadata | None:
        """Queue `record` for `<topic>.dlq` with `reason`; never raises a Kafka error."""
        value = record.value or b""
        headers = [(k, v) for k, v in record.headers if k.lower() not in _ADDED_HEADERS]
        headers += [
            ("reject-reason", reason.encode("utf-8")),
            ("reject-detail", _truncate_utf8(detail, DETAIL_MAX_BYTES)),
            ("source-partition", str(record.partition).encode()),
            ("source-offset", str(record.offset).encode()),
            ("source-value-bytes", str(len(value)).encode()),
        ]
        if len(value) > self._max_value_bytes:
            value = b""
        try:
            future = self._producer.send(
                dlq_topic(record.topic), value=value, key=record.key, headers=headers
            )
        except KafkaError as exc:
            self._failed(record, reason, exc)
            return None
        future.add_errback(self._failed, record, reason)
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for queued records; False if some are still pending."""
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            log.warning("dlq_flush_timeout", error=repr(exc))
            return False
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued (up to `timeout` seconds) and close the producer."""
        try:
            self._producer.close(timeout=timeout)
        except KafkaError as exc:
            log.warning("dlq_close_failed", error=repr(exc))

    def _failed(self, record: RawRecord, reason: str, exc: BaseException) -> None:
        """Log and count one DLQ record that was lost."""
        with self._lock:
            self._failures += 1
        log.warning(
            "dlq_send_failed",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            error=repr(exc),
        )


def _truncate_utf8(text: str, limit: int) -> bytes:
    """`text` as UTF-8 cut to at most `limit` bytes, never inside a character."""
    encoded = text.encode("utf-8", "replace")[:limit]
    return encoded.decode("utf-8", "ignore").encode("utf-8")
