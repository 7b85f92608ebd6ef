"""DeadLetterQueue: what a DLQ record carries, and that Kafka failures never reach the caller.

The record contents are checked on the real embedded broker; failures that a healthy
broker cannot be made to produce on demand (a delivery failing after it was queued, a
flush timing out) are injected with a stub producer returning kafka-python's own futures.
"""

from __future__ import annotations

import itertools
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.future import Future
from structlog.testing import capture_logs

from streamer.dlq import DETAIL_MAX_BYTES, DeadLetterQueue, dlq_topic
from streamer.records import RawRecord
from streamer.topics import ensure_topic
from tests.kafka_fixtures import unique_topic


def consume(bootstrap: str, topic: str, count: int) -> list:
    """The first `count` records of partition 0 of `topic`."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=10_000)
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    try:
        return list(itertools.islice(consumer, count))
    finally:
        consumer.close()


def rejected(topic: str, value: bytes | None = b"\x89PNG broken") -> RawRecord:
    """A consumed record as the DLQ gets it, carrying a forged reject header of its own."""
    headers = [("domain", b"photos"), ("Reject-Reason", b"forged")]
    return RawRecord(topic, partition=3, offset=41, value=value, headers=headers, key=b"k1")


def test_records_go_to_the_dlq_topic_unchanged_with_why(broker):
    topic = unique_topic("dlq")
    ensure_topic(broker.bootstrap, dlq_topic(topic))
    dlq = DeadLetterQueue.connect(broker.bootstrap)
    record = rejected(topic)
    assert dlq.send(record, "corrupt_image", "png: truncated") is not None
    dlq.send(rejected(topic, value=None), "empty", "\u00e9" * 400 + "\ud800")
    assert dlq.flush(10)
    dlq.close()
    first, second = consume(broker.bootstrap, f"{topic}.dlq", 2)
    assert (first.value, first.key) == (record.value, b"k1")
    assert list(first.headers) == [
        ("domain", b"photos"),  # the forged reject-reason is replaced, not repeated
        ("reject-reason", b"corrupt_image"),
        ("reject-detail", b"png: truncated"),
        ("source-partition", b"3"),
        ("source-offset", b"41"),
        ("source-value-bytes", str(len(record.value)).encode()),
    ]
    headers = dict(second.headers)
    assert (second.value, headers["source-value-bytes"]) == (b"", b"0")  # a null value
    assert len(headers["reject-detail"]) == DETAIL_MAX_BYTES  # cut on a character boundary:
    assert headers["reject-detail"].decode("utf-8") == "\u00e9" * (DETAIL_MAX_BYTES // 2)
    assert dlq.failures == 0


def test_oversized_value_is_dropped_but_its_length_kept(broker):
    topic = unique_topic("dlq")
    ensure_topic(broker.bootstrap, dlq_topic(topic))
    dlq = DeadLetterQueue(KafkaProducer(bootstrap_servers=broker.bootstrap), max_value_bytes=4999)
    dlq.send(rejected(topic, value=b"x" * 5000), "too_large")
    dlq.close()
    [message] = consume(broker.bootstrap, f"{topic}.dlq", 1)
    assert message.value == b""
    assert dict(message.headers)["source-value-bytes"] == b"5000"


def test_a_send_that_cannot_be_queued_is_logged_and_counted_not_raised():
    # No broker listens on port 1: the metadata wait times out inside producer.send.
    producer = KafkaProducer(bootstrap_servers="127.0.0.1:1", api_version=(2, 8), max_block_ms=200)
    dlq = DeadLetterQueue(producer)
    with capture_logs() as logs:
        assert dlq.send(rejected("images"), "corrupt_image") is None
    dlq.close(timeout=1)
    assert dlq.failures == 1
    assert logs[0]["event"] == "dlq_send_failed"
    assert (logs[0]["partition"], logs[0]["offset"], logs[0]["reason"]) == (3, 41, "corrupt_image")


class StubProducer:
    """Failure injection: hands out kafka-python futures the test resolves; flush can fail."""

    def __init__(self, flush_error: Exception | None = None) -> None:
        self.futures: list[Future] = []
        self.flush_error = flush_error

    def send(self, topic: str, **kwargs: Any) -> Future:
        self.futures.append(Future())
        return self.futures[-1]

    def flush(self, timeout: float | None = None) -> None:
        if self.flush_error:
            raise self.flush_error


def test_a_delivery_failure_later_is_logged_and_counted():
    producer = StubProducer()
    dlq = DeadLetterQueue(producer)
    dlq.send(rejected("images"), "unsafe_tar")
    dlq.send(rejected("images"), "unsafe_tar")
    with capture_logs() as logs:
        producer.futures[0].failure(KafkaError("broker gone"))
        producer.futures[1].success(None)
    assert dlq.failures == 1
    assert [entry["event"] for entry in logs] == ["dlq_send_failed"]


def test_flush_reports_a_timeout_instead_of_raising():
    assert DeadLetterQueue(StubProducer()).flush(1.0) is True
    assert DeadLetterQueue(StubProducer(KafkaTimeoutError())).flush(1.0) is False
