"""Background polling, decoding and batching, so training never waits on the network.

A thread polls the source, decodes records (optionally on a small thread pool, in
order), turns images into `Sample`s and queues `Batch`es. Memory is bounded by the
queue (`queue_batches` batches) plus the samples of one poll.

Each batch carries `positions`: per partition, the offset of the first record not
wholly inside this or an earlier batch. A record counts as consumed once all its
samples are batched, or once `on_reject` ran for it, or when it yields no sample.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from streamer.records import (
    Batch,
    Decoded,
    DecodedImage,
    ParallelMap,
    RawRecord,
    RejectedRecord,
    Sample,
)
from streamer.source import KafkaSource

POLL_TIMEOUT_MS = 100


def to_sample(record: RawRecord, image: DecodedImage) -> Sample:
    """The Sample for one decoded image of `record` (identity, domain, label, probe flag)."""
    headers = image.headers
    sample_id = headers.get("sample-id") or hashlib.sha256(image.encoded).hexdigest()[:32]
    if image.key is not None and ("sample-id", sample_id.encode()) in record.headers:
        sample_id = f"{sample_id}/{image.key}"  # tar members without their own id stay distinct
    return Sample(
        sample_id=sample_id,
        image=image.image,
        encoded=image.encoded,
        domain=headers.get("domain") or "default",
        label=headers.get("label") or None,
        probe=headers.get("probe") == "1",
        partition=record.partition,
        offset=record.offset,
    )


log = structlog.get_logger()
LAG_REFRESH_S = 3.0
STALE_S = 30.0  # no successful broker round trip for this long: not ready, even if TCP connects


class Prefetcher:
    """Yields `Batch`es of `batch_size` samples from a KafkaSource, prepared ahead.

    With `split_on_domain`, a batch never mixes domains (a domain change closes the
    batch early). A partial batch is also emitted once no record arrived for
    `linger_s`, so a trickle of data is trained on without waiting for a full batch.
    An exception in the thread (other than RejectedRecord) is raised by `get`.
    `prepare(samples)`, if given, runs on the prefetch thread for each batch and its
    result rides along as `Batch.prepared` (the daemon stacks and pins the images there,
    so the training thread only launches the copy to the GPU).
    `decode_batch(records, parallel_map)`, if given, replaces `decode` and decodes each poll's
    records as a whole (`streamer.jpeg_batch.JpegBatchDecoder`: JPEGs in one GPU call),
    running its per-record work through `parallel_map` on the worker threads.
    """

    def __init__(
        self,
        source: KafkaSource,
        decode: Callable[[RawRecord], list[DecodedImage]],
        on_reject: Callable[[RawRecord, RejectedRecord], None],
        batch_size: int,
        split_on_domain: bool,
        queue_batches: int = 4,
        workers: int = 1,
        linger_s: float = 0.5,
        prepare: Callable[[list[Sample]], Any] | None = None,
        decode_batch: Callable[[list[RawRecord], ParallelMap], list[Decoded]] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._source = source
        self._decode = decode
        self._on_reject = on_reject
        self.batch_size = batch_size
        self.split_on_domain = split_on_domain
        self.workers = workers
        self.linger_s = linger_s
        self._prepare = prepare
        self._decode_batch = decode_batch
        self.records_consumed = 0  # records handled so far (decoded or rejected)
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=queue_batches)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._pending: list[Sample] = []  # decoded samples not yet in a batch, stream order
        self._consumed: dict[int, int] = {}  # partition -> offset after the last handled record
        self._lag: dict[int, int] = {}
        self._lag_at = float("-inf")
        self._commit: dict[int, int] | None = None
        self._last_ok = time.monotonic()  # last successful broker round trip (lag query)
        self._broker_ok = True

    def start(self) -> None:
        """Start the background thread (resuming from the source's seek positions)."""
        self._consumed = dict(self._source.start_positions)
        self._thread = threading.Thread(target=self._run, name="tailord-prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; queued batches are dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def get(self, timeout: float | None = None) -> Batch | None:
        """The next batch, or None if none is ready within `timeout` seconds."""
        if self._failure is not None:
            raise self._failure
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._failure = item
            raise item
        return item

    def lag(self) -> dict[int, int]:
        """Consumer lag per partition as last measured by the prefetch thread (no I/O here)."""
        return dict(self._lag)

    def reachable(self) -> bool:
        """Whether the broker accepts connections and answered a request recently.

        The TCP check alone stays true for a half-open (frozen) broker; the round-trip age
        catches that.
        """
        return self._source.reachable() and time.monotonic() - self._last_ok < STALE_S

    def request_commit(self, positions: dict[int, int]) -> None:
        """Commit `positions` to the group from the prefetch thread, which owns the consumer."""
        self._commit = dict(positions)

    def _housekeeping(self) -> None:
        """Refresh the lag every few seconds and run a requested commit, on the consumer's thread."""
        if self._commit is not None:
            positions, self._commit = self._commit, None
            self._source.commit(positions)
        if time.monotonic() - self._lag_at > LAG_REFRESH_S:
            lag = self._source.lag()
            self._lag_at = time.monotonic()
            if lag:
                self._lag, self._last_ok = lag, self._lag_at
            ok = self.reachable()
            if ok != self._broker_ok:
                self._broker_ok = ok
                (log.info if ok else log.warning)("broker_recovered" if ok else "broker_unreachable",
                                                  topic=self._source.topic)

    def _run(self) -> None:
        pool = ThreadPoolExecutor(self.workers, "tailord-decode") if self.workers > 1 else None
        try:
            last_data = time.monotonic()
            while not self._stop.is_set():
                self._housekeeping()
                records = self._source.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=self.batch_size)
                if records:
                    last_data = self._last_ok = time.monotonic()
                    for record, result in zip(records, self._decode_poll(records, pool), strict=True):
                        self._take(record, result)
                    self._drain(final=False)
                elif self._pending and time.monotonic() - last_data >= self.linger_s:
                    self._drain(final=True)
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer thread via get)
            self._put(exc)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _decode_poll(self, records: list[RawRecord], pool: ThreadPoolExecutor | None) -> list[Decoded]:
        """One result per record, in order: through `decode_batch` if given, else one by one."""

        def parallel_map(decode: Callable[[RawRecord], Decoded], some: list[RawRecord]) -> list[Decoded]:
            return list((pool.map if pool else map)(decode, some))

        if self._decode_batch is not None:
            return self._decode_batch(records, parallel_map)
        return parallel_map(self._try_decode, records)

    def _try_decode(self, record: RawRecord) -> Decoded:
        try:
            return self._decode(record)
        except RejectedRecord as rejected:
            return rejected

    def _take(self, record: RawRecord, result: Decoded) -> None:
        """Account for one record: reject it, or queue its samples as pending."""
        if isinstance(result, RejectedRecord):
            self._on_reject(record, result)
        else:
            self._pending.extend(to_sample(record, image) for image in result)
        self._consumed[record.partition] = record.offset + 1
        self.records_consumed += 1

    def _drain(self, final: bool) -> None:
        """Emit full batches (and domain-boundary ones); with `final`, the rest too."""
        while self._pending:
            run = len(self._pending)
            if self.split_on_domain:
                first = self._pending[0].domain
                run = next(
                    (i for i, s in enumerate(self._pending) if s.domain != first),
                    len(self._pending),
                )
            if run >= self.batch_size:
                self._emit(self.batch_size)
            elif run < len(self._pending) or final:
                self._emit(run)
            else:
                return

    def _emit(self, count: int) -> None:
        samples, self._pending = self._pending[:count], self._pending[count:]
        positions = dict(self._consumed)
        for p, offset in self._oldest_pending():
            positions[p] = offset
        prepared = self._prepare(samples) if self._prepare is not None else None
        self._put(Batch(samples=samples, positions=positions, prepared=prepared))

    def _oldest_pending(self) -> Iterator[tuple[int, int]]:
        """(partition, offset) of the first record per partition with samples still pending."""
        seen: set[int] = set()
        for sample in self._pending:
            if sample.partition not in seen:
                seen.add(sample.partition)
                yield sample.partition, sample.offset

    def _put(self, item: Batch | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
