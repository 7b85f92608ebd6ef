"""The Kafka consumer: manual partition assignment, offsets owned by the caller.

The stream position lives in tailord's checkpoints, not in the consumer group: the
source is assigned its partitions (no group join, so no rebalance wait) and seeked to
the checkpoint's positions. The group id is still used to commit offsets, so standard
tooling can watch the daemon's progress.

All methods may be called from different threads (the prefetch thread polls, the
daemon commits and reads lag); they are serialized by a lock because kafka-python's
consumer is not thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import structlog
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from streamer.limits import DecodeLimits
from streamer.records import RawRecord
from streamer.topics import tcp_reachable

log = structlog.get_logger()

FETCH_OVERHEAD_BYTES = 64 * 1024  # record batch framing around the largest allowed record
CALL_TIMEOUT_MS = 2_000  # bound for lag() and commit() so a dead broker cannot stall the daemon
MAX_BACKOFF_S = 2.0
REACHABLE_CACHE_S = 1.0


def partitions_for_rank(all_partitions: Iterable[int], rank: int, world: int) -> list[int]:
    """The partitions DDP rank `rank` of `world` consumes: every world-th, round-robin.

    Raises ValueError when there are fewer partitions than ranks (an idle rank would
    stall the collective operations of the others).
    """
    ordered = sorted(all_partitions)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    if len(ordered) < world:
        raise ValueError(
            f"the topic has {len(ordered)} partition(s) for {world} ranks; "
            f"create it with at least {world} partitions"
        )
    return ordered[rank::world]


class KafkaSource:
    """Reads one topic from explicitly assigned partitions.

    The broker must be reachable and the topic must exist when the source is made
    (ConnectionError / ValueError otherwise). `shard=(rank, world)` takes that DDP
    rank's share of the partitions (`partitions_for_rank`). Later outages are survived: kafka-python
    reconnects by itself, `poll` returns [] meanwhile and logs instead of raising.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        client: dict[str, Any],
        partitions: list[int] | None = None,
        *,
        max_record_bytes: int = DecodeLimits().max_record_bytes,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if not tcp_reachable(bootstrap):
            raise ConnectionError(f"Kafka broker {bootstrap} is not reachable")
        self.topic = topic
        self._bootstrap = bootstrap
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._failures = 0
        self._reachable_at = (float("-inf"), False)
        fetch_bytes = max_record_bytes + FETCH_OVERHEAD_BYTES
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=fetch_bytes,
            fetch_max_bytes=fetch_bytes,
            request_timeout_ms=30_000,
            reconnect_backoff_ms=100,
            reconnect_backoff_max_ms=5_000,
            bootstrap_timeout_ms=10_000,
            **client,
        )
        available = self._consumer.partitions_for_topic(topic)
        chosen = sorted(available) if partitions is None else sorted(partitions)
        if shard is not None and available:
            try:
                chosen = partitions_for_rank(available, *shard)
            except ValueError:
                self._consumer.close(autocommit=False)
                raise
        unknown = set(chosen) - available
        if not available or unknown:
            self._consumer.close(autocommit=False)
            what = f"has no partition(s) {sorted(unknown)}" if available else "does not exist"
            raise ValueError(f"topic {topic!r} on {bootstrap} {what}")
        self._tps = {p: TopicPartition(topic, p) for p in chosen}
        self._consumer.assign(list(self._tps.values()))
        self._expected: dict[int, int | None] = {}
        self.start_positions: dict[int, int] = {}
        self.seek({})

    @property
    def partitions(self) -> list[int]:
        """The assigned partitions."""
        return list(self._tps)

    def seek(self, positions: dict[int, int]) -> None:
        """Read each assigned partition from positions[p], or from its beginning if absent.

        Offsets committed to the group are never used: the caller's positions decide.
        """
        with self._lock:
            for p, tp in self._tps.items():
                if p in positions:
                    self._consumer.seek(tp, positions[p])
                else:
                    self._consumer.seek_to_beginning(tp)
                self._expected[p] = positions.get(p)
            self.start_positions = {p: o for p, o in positions.items() if p in self._tps}

    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[RawRecord]:
        """Records in offset order per partition; [] after `timeout_ms` without data.

        Errors are logged and answered with [] after a growing pause (up to 2 s), so a
        caller looping on poll never spins.
        """
        try:
            with self._lock:
                fetched = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
                records = [
                    RawRecord(m.topic, m.partition, m.offset, m.value, list(m.headers or []), m.key)
                    for messages in fetched.values()
                    for m in messages
                ]
                for record in records:
                    self._expected[record.partition] = record.offset + 1
                self._restart_truncated({r.partition for r in records})
        except (KafkaError, OSError) as exc:
            self._failures += 1
            log_fn = log.warning if self._failures == 1 else log.debug
            log_fn("kafka_poll_failed", topic=self.topic, failures=self._failures, error=repr(exc))
            self._wake.wait(min(MAX_BACKOFF_S, 0.1 * 2 ** min(self._failures, 5)))
            return []
        if self._failures:
            log.info("kafka_poll_recovered", topic=self.topic, failures=self._failures)
            self._failures = 0
        return records

    def _restart_truncated(self, delivered: set[int]) -> None:
        """Restart from the beginning any partition whose log now ends before our position.

        Real Kafka answers such a fetch with OFFSET_OUT_OF_RANGE (and auto_offset_reset
        restarts it), but tansu answers with no records, so after the in-memory broker
        restarts a consumer resuming from checkpoint offsets would silently skip every
        new record below them. The fetch's high watermark reveals it.
        """
        for p, tp in self._tps.items():
            expected, end = self._expected[p], self._consumer.highwater(tp)
            if p in delivered or expected is None or end is None or end >= expected:
                continue
            log.warning(
                "kafka_partition_truncated",
                topic=self.topic,
                partition=p,
                end=end,
                resume_position=expected,
                action="the topic was recreated or the broker lost its data; reading from the start",
            )
            self._consumer.seek_to_beginning(tp)
            self._expected[p] = None

    def lag(self) -> dict[int, int]:
        """Records not yet fetched per partition (end offset - position); {} if unknown.

        The end is the larger of ListOffsets and the last fetch's high watermark: tansu's
        ListOffsets reports the last record *batch*'s base offset + 1, short of the end.
        """
        with self._lock:
            try:
                ends = self._consumer.end_offsets(
                    list(self._tps.values()), timeout_ms=CALL_TIMEOUT_MS
                )
                lags = {}
                for p, tp in self._tps.items():
                    end = max(ends.get(tp) or 0, self._consumer.highwater(tp) or 0)
                    position = self._consumer.position(tp, timeout_ms=CALL_TIMEOUT_MS)
                    if position is not None:
                        lags[p] = max(0, end - position)
                return lags
            except KafkaError as exc:
                log.debug("kafka_lag_failed", topic=self.topic, error=repr(exc))
                return {}

    def commit(self, positions: dict[int, int]) -> bool:
        """Commit `positions` of assigned partitions to the group (monitoring only).

        Returns False (and logs) on failure instead of raising.
        """
        offsets = {
            self._tps[p]: OffsetAndMetadata(offset, "", -1)
            for p, offset in positions.items()
            if p in self._tps
        }
        with self._lock:
            try:
                self._consumer.commit(offsets, timeout_ms=CALL_TIMEOUT_MS)
                return True
            except KafkaError as exc:
                log.warning("kafka_commit_failed", topic=self.topic, error=repr(exc))
                return False

    def reachable(self) -> bool:
        """Whether a bootstrap server accepts TCP connections (cached for 1 s)."""
        checked_at, ok = self._reachable_at
        if time.monotonic() - checked_at > REACHABLE_CACHE_S:
            ok = tcp_reachable(self._bootstrap)
            self._reachable_at = (time.monotonic(), ok)
        return ok

    def close(self) -> None:
        """Close the consumer (nothing is committed)."""
        self._wake.set()
        with self._lock:
            self._consumer.close(autocommit=False)
