"""KafkaSource and Prefetcher against a real embedded broker (no Kafka mocks).

The central property: a batch's `positions` are a safe resume point. Seeking there
yields every sample not yet trained, and re-yields at most the samples of a record
(a tar batch) that was split across batches.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator

import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from PIL import Image

from streamer.decode import decode_record
from streamer.jpeg_batch import JpegBatchDecoder
from streamer.limits import DecodeLimits
from streamer.prefetch import Prefetcher, to_sample
from streamer.produce import produce, tar_batch
from streamer.records import Batch, DecodedImage, RawRecord, RejectedRecord
from streamer.source import KafkaSource, partitions_for_rank
from streamer.sources import Item
from streamer.topics import ensure_topic
from tests.kafka_fixtures import start_broker, unique_topic


def decode(record: RawRecord) -> list[DecodedImage]:
    return decode_record(record.value, record.headers, DecodeLimits(), 16)


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def producer(broker) -> Iterator[KafkaProducer]:
    client = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
    yield client
    client.close()


def send(producer: KafkaProducer, topic: str, partition: int, spec: str | list[str], domain="d"):
    """One record: a PNG with sample-id `spec`, a tar of PNGs for a list, or garbage ("!")."""
    if spec == "!":
        value, headers = b"not an image", {}
    elif isinstance(spec, str):
        value, headers = png(len(spec) * 9), {"sample-id": spec}
    else:
        members = [
            (Item(png(i * 40), "png", None, sid), {"sample-id": sid}) for i, sid in enumerate(spec)
        ]
        value, headers = tar_batch(members), {}
    headers["domain"] = domain
    producer.send(
        topic,
        value=value,
        partition=partition,
        headers=[(k, v.encode()) for k, v in headers.items()],
    ).get(timeout=10)


def drain(source: KafkaSource, count: int, max_records: int | None = None) -> list[RawRecord]:
    records: list[RawRecord] = []
    deadline = time.monotonic() + 10
    while len(records) < count and time.monotonic() < deadline:
        records += source.poll(timeout_ms=200, max_records=max_records)
    return records


def collect(prefetcher: Prefetcher, want: set[str], timeout: float = 10.0) -> list[Batch]:
    """Batches until every sample id in `want` arrived (fails after `timeout` seconds)."""
    batches: list[Batch] = []
    deadline = time.monotonic() + timeout
    while not want <= {s.sample_id for b in batches for s in b.samples}:
        assert time.monotonic() < deadline, (
            f"missing {want - {s.sample_id for b in batches for s in b.samples}}"
        )
        if (batch := prefetcher.get(timeout=0.1)) is not None:
            batches.append(batch)
    return batches


def run_prefetcher(
    bootstrap: str, topic: str, positions: dict[int, int], want: set[str], **kwargs
) -> tuple[list[Batch], list]:
    rejected: list[tuple[RawRecord, RejectedRecord]] = []
    source = KafkaSource(bootstrap, topic, "tests", {})
    source.seek(positions)
    prefetcher = Prefetcher(
        source,
        decode,
        lambda r, e: rejected.append((r, e)),
        batch_size=2,
        split_on_domain=True,
        **kwargs,
    )
    prefetcher.start()
    try:
        return collect(prefetcher, want), rejected
    finally:
        prefetcher.stop()
        source.close()


def test_produced_digits_arrive_with_their_headers(broker) -> None:
    topic = unique_topic("digits")
    assert produce("builtin:digits", topic, broker.bootstrap, limit=50, progress=False) == 50
    source = KafkaSource(broker.bootstrap, topic, "tests", {})
    records = drain(source, 50)
    source.close()
    assert [r.offset for r in records] == list(range(50))
    first = dict(records[0].headers)
    assert first["content-type"] == b"image/png"
    assert first["domain"] == b"digits"
    assert first["sample-id"] == b"digits/digits-000000"
    assert first["label"] == b"0"
    assert len({dict(r.headers)["sample-id"] for r in records}) == 50
    assert all(len(decode(r)) == 1 for r in records)


def test_tar_batches_carry_per_sample_headers(broker) -> None:
    topic = unique_topic("tar")
    sent = produce(
        "builtin:digits",
        topic,
        broker.bootstrap,
        domain="mine",
        limit=20,
        batch=8,
        probe_every=5,
        progress=False,
    )
    assert sent == 20
    source = KafkaSource(broker.bootstrap, topic, "tests", {})
    records = drain(source, 3)
    source.close()
    assert len(records) == 3
    samples = [to_sample(r, image) for r in records for image in decode(r)]
    assert [s.sample_id for s in samples] == [f"mine/digits-{i:06d}" for i in range(20)]
    assert [i for i, s in enumerate(samples) if s.probe] == [4, 9, 14, 19]
    assert {s.domain for s in samples} == {"mine"}
    assert all(s.label is not None for s in samples)


def test_seek_lag_and_commit(broker, producer) -> None:
    topic = unique_topic("seek")
    ensure_topic(broker.bootstrap, topic)
    for i in range(30):
        send(producer, topic, 0, f"s{i}")
    source = KafkaSource(broker.bootstrap, topic, "seek-group", {})
    source.seek({0: 10})
    assert [r.offset for r in drain(source, 5, max_records=5)] == [10, 11, 12, 13, 14]
    assert source.lag() == {0: 15}
    assert source.commit({0: 15})
    source.close()

    watcher = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="seek-group")
    assert watcher.committed(TopicPartition(topic, 0)) == 15  # commit works with manual assign
    watcher.close()
    fresh = KafkaSource(broker.bootstrap, topic, "seek-group", {})  # no seek: the beginning,
    assert drain(fresh, 1, max_records=1)[0].offset == 0  # never the committed offset
    fresh.close()


def test_a_log_shorter_than_the_resume_position_is_read_from_the_start(broker, producer) -> None:
    topic = unique_topic("short")  # as after a restart of the in-memory broker
    ensure_topic(broker.bootstrap, topic)
    for i in range(5):
        send(producer, topic, 0, f"s{i}")
    source = KafkaSource(broker.bootstrap, topic, "tests", {})
    source.seek({0: 1000})
    assert [r.offset for r in drain(source, 5)] == [0, 1, 2, 3, 4]
    source.close()


def test_source_survives_a_broker_outage() -> None:
    with start_broker() as running:
        topic = unique_topic("outage")
        ensure_topic(running.bootstrap, topic)
        source = KafkaSource(running.bootstrap, topic, "tests", {})
    started = time.monotonic()
    assert [source.poll(timeout_ms=200) for _ in range(3)] == [[], [], []]
    assert time.monotonic() - started >= 0.55  # waits out its timeout: no busy loop
    assert not source.reachable()
    assert source.commit({0: 1}) is False
    source.close()


def test_source_needs_a_reachable_broker_and_an_existing_topic(broker) -> None:
    with start_broker() as running:
        down = running.bootstrap
    with pytest.raises(ConnectionError, match="not reachable"):
        KafkaSource(down, "t", "tests", {})
    with pytest.raises(ValueError, match="does not exist"):
        KafkaSource(broker.bootstrap, unique_topic("missing"), "tests", {})


def test_partitions_for_rank() -> None:
    assert partitions_for_rank(range(6), 1, 2) == [1, 3, 5]
    assert partitions_for_rank([2, 0, 1], 0, 3) == [0]
    with pytest.raises(ValueError, match="at least 4 partitions"):
        partitions_for_rank([0, 1], 0, 4)


def record_samples(topic_layout: dict[int, list]) -> dict[tuple[int, int], set[str]]:
    """(partition, offset) -> sample ids of that record (empty for a rejected one)."""
    return {
        (p, offset): set() if spec == "!" else {spec} if isinstance(spec, str) else set(spec)
        for p, specs in topic_layout.items()
        for offset, spec in enumerate(specs)
    }


def test_positions_resume_without_skipping(broker, producer) -> None:
    layout = {
        0: ["a", ["b1", "b2", "b3"], "!", "c", ["d1", "d2"]],
        1: [["e1", "e2", "e3"], "f"],
    }
    topic = unique_topic("resume")
    ensure_topic(broker.bootstrap, topic, partitions=2)
    for p, specs in layout.items():
        for spec in specs:
            send(producer, topic, p, spec)
    records = record_samples(layout)
    every = set().union(*records.values())

    batches, rejected = run_prefetcher(broker.bootstrap, topic, {}, every, workers=2, linger_s=1.0)
    assert [(r.partition, r.offset, e.reason) for r, e in rejected] == [(0, 2, "unknown_format")]
    ids = [s.sample_id for b in batches for s in b.samples]
    assert sorted(ids) == sorted(every)  # each sample exactly once
    for p in layout:  # stream order within a partition
        in_p = [s.offset for b in batches for s in b.samples if s.partition == p]
        assert in_p == sorted(in_p)
    assert all(len(b.samples) == 2 for b in batches[:-1]) and len(batches[-1].samples) == 1
    assert batches[-1].positions == {0: 5, 1: 2}

    trained: set[str] = set()
    split_seen = False
    for batch in batches:
        trained |= {s.sample_id for s in batch.samples}
        for p, position in batch.positions.items():
            before = [ids for (q, o), ids in records.items() if q == p and o < position]
            assert set().union(*before) <= trained  # nothing before the position is untrained
            at = records.get((p, position), set())
            assert not at or not at <= trained  # the record at the position is not done
            split_seen |= bool(at & trained)
        resumed, _ = run_prefetcher(
            broker.bootstrap, topic, batch.positions, every - trained, linger_s=0.1
        )
        again = {s.sample_id for b in resumed for s in b.samples}
        partly = set().union(*(records.get((p, o), set()) for p, o in batch.positions.items()))
        assert every - trained <= again  # no skips
        assert again - (every - trained) <= partly & trained  # repeats: only a split record
    assert split_seen  # a tar record was split across two batches (and resumed correctly)


def test_batches_never_mix_domains(broker, producer) -> None:
    topic = unique_topic("domains")
    ensure_topic(broker.bootstrap, topic)
    for sid, domain in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")]:
        send(producer, topic, 0, sid, domain=domain)
    source = KafkaSource(broker.bootstrap, topic, "tests", {})
    prefetcher = Prefetcher(
        source, decode, lambda r, e: None, batch_size=3, split_on_domain=True, linger_s=0.3
    )
    prefetcher.start()
    batches = collect(prefetcher, {"a1", "a2", "b1", "a3"})
    prefetcher.stop()
    source.close()
    assert [[s.sample_id for s in b.samples] for b in batches] == [["a1", "a2"], ["b1"], ["a3"]]
    assert [b.positions for b in batches] == [{0: 2}, {0: 3}, {0: 4}]


def test_batched_jpeg_decoding_through_the_prefetcher(broker, producer) -> None:
    """With a JpegBatchDecoder the stream yields the same samples in the same order, and a
    bad record still reaches on_reject; JPEG pixels match the per-record decode closely."""
    topic = unique_topic("jpegs")
    ensure_topic(broker.bootstrap, topic)
    for i in range(5):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + i, 30), (40 * i, 90, 200 - 30 * i)).save(buffer, format="JPEG")
        producer.send(topic, value=buffer.getvalue(), partition=0,
                      headers=[("sample-id", f"j{i}".encode()), ("domain", b"d")]).get(timeout=10)
    send(producer, topic, 0, "p0")
    send(producer, topic, 0, "!")
    want = {"j0", "j1", "j2", "j3", "j4", "p0"}
    decoder = JpegBatchDecoder(DecodeLimits(), 16, torch.device("cpu"))
    batched, rejected = run_prefetcher(broker.bootstrap, topic, {}, want, decode_batch=decoder)
    plain, _ = run_prefetcher(broker.bootstrap, topic, {}, want)
    samples = [s for b in batched for s in b.samples]
    reference = [s for b in plain for s in b.samples]
    assert [s.sample_id for s in samples] == [s.sample_id for s in reference]
    assert [(r.offset, e.reason) for r, e in rejected] == [(6, "unknown_format")]
    for got, expected in zip(samples, reference, strict=True):
        assert (got.image.float() - expected.image.float()).abs().mean() < 2.0


def test_decoder_errors_surface_in_get(broker, producer) -> None:
    topic = unique_topic("boom")
    ensure_topic(broker.bootstrap, topic)
    send(producer, topic, 0, "x")

    def broken(record: RawRecord) -> list[DecodedImage]:
        raise KeyError("decoder bug")

    source = KafkaSource(broker.bootstrap, topic, "tests", {})
    prefetcher = Prefetcher(source, broken, lambda r, e: None, batch_size=2, split_on_domain=False)
    prefetcher.start()
    with pytest.raises(KeyError, match="decoder bug"):
        for _ in range(20):
            prefetcher.get(timeout=0.5)
    with pytest.raises(KeyError):  # and keeps saying so
        prefetcher.get(timeout=0.1)
    prefetcher.stop()
    source.close()


def test_sample_identity_defaults() -> None:
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    record = RawRecord("t", 3, 17, b"v", [("sample-id", b"rec")])
    bare = to_sample(record, DecodedImage(image, b"bytes", "png", None, {}))
    assert bare.sample_id == hashlib.sha256(b"bytes").hexdigest()[:32]
    assert (bare.domain, bare.label, bare.probe, bare.partition, bare.offset) == (
        "default",
        None,
        False,
        3,
        17,
    )
    member = to_sample(
        record, DecodedImage(image, b"m", "png", "k1", {"sample-id": "rec", "probe": "1"})
    )
    assert member.sample_id == "rec/k1" and member.probe
    own = to_sample(
        record, DecodedImage(image, b"m", "png", "k1", {"sample-id": "own", "label": "cat"})
    )
    assert (own.sample_id, own.label) == ("own", "cat")
