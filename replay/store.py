"""Sample store: encoded images in append-only shards, located by the SQLite catalog.

Layout under ``root``: ``samples/shard-000001.bin`` … and ``catalog.sqlite``.
A record is a 12-byte header (magic, payload length, crc32) then the encoded
image; the catalog points at the payload. Shard bytes are appended and
fsynced *before* their catalog rows commit, so a crash leaves at most
unreferenced tail bytes (cut on the next open), never a row pointing at
missing bytes. Over the disk budget, each experience keeps an equal share
(max-min fair) and the ones over it drop uniformly random samples (probes
last) until the total is back under ``low_water`` x budget, so the O(n)
eviction pass runs once per few percent of budget rather than per batch;
shards left mostly dead are rewritten.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from replay.catalog import Catalog, SampleRow
from safefiles.files import fsync_path

HEADER = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
MAGIC = b"TLSR"
SHARD_BYTES = 64 << 20


class CorruptRecord(ValueError):
    """A stored record whose header or crc32 does not match its catalog row."""


def _shard_name(number: int) -> str:
    return f"shard-{number:06d}.bin"


def _shard_number(name: str) -> int:
    return int(name[len("shard-") : -len(".bin")])


def fair_share(sizes: dict[int, int], budget: int) -> float:
    """Max-min fair cap c: every size above c is cut to c and sum(min(size, c)) <= budget."""
    remaining = float(budget)
    ordered = sorted(sizes.values())
    for i, size in enumerate(ordered):
        share = remaining / (len(ordered) - i)
        if size > share:
            return share
        remaining -= size
    return float("inf")


class SampleStore:
    """Append-only shard files + catalog, bounded by ``max_bytes`` of records.

    ``on_evict`` (e.g. ``VectorIndex.remove``) is called with the ids dropped
    by the budget, after their catalog rows are gone.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        seed: int = 0,
        shard_bytes: int = SHARD_BYTES,
        compact_below: float = 0.5,
        low_water: float = 0.95,
        on_evict: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.shard_bytes = shard_bytes
        self.compact_below = compact_below
        self.low_water = low_water
        self.on_evict = on_evict
        self.shards = self.root / "samples"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.root / "catalog.sqlite")
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._active = self._recover()
        self._usage = self._counted_usage()

    def _counted_usage(self) -> dict[int, list[int]]:
        """experience -> [records, record bytes incl. headers], counted in the catalog."""
        return {exp: [n, b + HEADER.size * n] for exp, (n, b) in self.catalog.experience_bytes().items()}

    def close(self) -> None:
        self.catalog.close()

    def _recover(self) -> str:
        """Make shards and catalog agree after a crash; returns the shard to append to."""
        extents = self.catalog.shard_extents()
        files = sorted(p.name for p in self.shards.glob("shard-*.bin"))
        for shard in set(extents) - set(files):
            self.catalog.delete_beyond(shard, 0)
        for i, name in enumerate(files):
            path = self.shards / name
            size = path.stat().st_size
            end = extents.get(name, (0, 0, 0))[0]
            if size < end:
                self.catalog.delete_beyond(name, size)
                end = self.catalog.shard_extents().get(name, (0, 0, 0))[0]
            if end == 0 and i < len(files) - 1:
                path.unlink()
            elif size > end:
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
        fsync_path(self.shards)
        return files[-1] if files else _shard_name(1)

    def _rotate(self) -> None:
        self._active = _shard_name(_shard_number(self._active) + 1)

    def _append(self, payloads: list[bytes]) -> list[tuple[str, int]]:
        """Append records (rotating shards at ``shard_bytes``), fsync; returns (shard, offset)s."""
        positions: list[tuple[str, int]] = []
        i = 0
        while i < len(payloads):
            path = self.shards / self._active
            size = path.stat().st_size if path.exists() else 0
            if size > 0 and size + HEADER.size + len(payloads[i]) > self.shard_bytes:
                self._rotate()
                continue
            with open(path, "ab") as f:
                while i < len(payloads):
                    payload = payloads[i]
                    if size > 0 and size + HEADER.size + len(payload) > self.shard_bytes:
                        break
                    positions.append((self._active, size + HEADER.size))
                    f.write(HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)))
                    f.write(payload)
                    size += HEADER.size + len(payload)
                    i += 1
                f.flush()
                os.fsync(f.fileno())
            fsync_path(self.shards)
        return positions

    def add(
        self,
        sample_ids: list[str],
        encoded: list[bytes],
        experience: int,
        domains: list[str],
        labels: list[str | None] | None = None,
        probes: list[bool] | None = None,
    ) -> int:
        """Store new samples (known ids are ignored), then enforce the budget. Returns added."""
        n = len(sample_ids)
        labels = [None] * n if labels is None else labels
        probes = [False] * n if probes is None else probes
        if not n == len(encoded) == len(domains) == len(labels) == len(probes):
            raise ValueError("sample_ids, encoded, domains, labels and probes differ in length")
        with self._lock:
            taken = set(self.catalog.get(sample_ids))
            picked = []
            for i, sid in enumerate(sample_ids):
                if sid not in taken:
                    taken.add(sid)
                    picked.append(i)
            if not picked:
                return 0
            positions = self._append([encoded[i] for i in picked])
            now = time.time()
            usage = self._usage.setdefault(experience, [0, 0])
            usage[0] += len(picked)
            usage[1] += sum(HEADER.size + len(encoded[i]) for i in picked)
            self.catalog.add_many(
                SampleRow(
                    sample_ids[i],
                    experience,
                    domains[i],
                    shard,
                    offset,
                    len(encoded[i]),
                    bool(probes[i]),
                    labels[i],
                    now,
                )
                for i, (shard, offset) in zip(picked, positions, strict=True)
            )
            self._enforce_budget()
        return len(picked)

    def hand_over(self, experience: int, to: int, trained: int) -> dict[str, int]:
        """File an experience's last ``trained`` non-probe samples, and the probes among them, under
        experience ``to`` (`Catalog.hand_over`: sample id -> experience now, for what changed); each
        experience's share of the budget follows."""
        with self._lock:
            filed = self.catalog.hand_over(experience, to, trained)
            self._usage = self._counted_usage()
        return filed

    def _enforce_budget(self) -> None:
        if sum(b for _, b in self._usage.values()) <= self.max_bytes:
            return
        cap = fair_share(
            {e: b for e, (_, b) in self._usage.items()}, self.low_water * self.max_bytes
        )
        evicted: list[str] = []
        for exp, usage in self._usage.items():
            if usage[1] <= cap:
                continue
            sizes = self.catalog.sizes(exp)
            train = [r for r in sizes if not r[2]]
            probe = [r for r in sizes if r[2]]
            order = [train[i] for i in self._rng.permutation(len(train))]
            order += [probe[i] for i in self._rng.permutation(len(probe))]
            for sample_id, length, _ in order:
                if usage[1] <= cap:
                    break
                evicted.append(sample_id)
                usage[0] -= 1
                usage[1] -= HEADER.size + length
        self._usage = {exp: usage for exp, usage in self._usage.items() if usage[0]}
        self.catalog.delete(evicted)
        if self.on_evict is not None:
            self.on_evict(evicted)
        self._compact()

    def _compact(self) -> None:
        """Rewrite shards whose live records fill less than ``compact_below`` of the file.

        Live records are appended to a fresh active shard and fsynced, their rows
        repointed in one transaction, and only then is the old file deleted.
        """
        extents = self.catalog.shard_extents()
        doomed = []
        for path in sorted(self.shards.glob("shard-*.bin")):
            size = path.stat().st_size
            _, live, n = extents.get(path.name, (0, 0, 0))
            if size > 0 and live + HEADER.size * n < self.compact_below * size:
                doomed.append(path)
        if any(path.name == self._active for path in doomed):
            self._rotate()
        for path in doomed:
            rows = self.catalog.by_shard(path.name)
            positions = self._append(self._read_rows(rows))
            self.catalog.move(
                (r.sample_id, shard, offset)
                for r, (shard, offset) in zip(rows, positions, strict=True)
            )
            path.unlink()
            fsync_path(self.shards)

    def _read_rows(self, rows: list[SampleRow]) -> list[bytes]:
        out: list[bytes] = []
        fds: dict[str, int] = {}
        try:
            for row in rows:
                if row.shard not in fds:
                    fds[row.shard] = os.open(self.shards / row.shard, os.O_RDONLY)
                start = row.offset - HEADER.size
                data = os.pread(fds[row.shard], HEADER.size + row.length, start)
                magic, length, crc = HEADER.unpack_from(data)
                payload = data[HEADER.size :]
                if magic != MAGIC or length != row.length or zlib.crc32(payload) != crc:
                    raise CorruptRecord(f"{row.sample_id}: bad record at {row.shard}:{start}")
                out.append(payload)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def read(self, sample_ids: list[str]) -> list[bytes]:
        """Encoded bytes of each id, in order; KeyError for unknown ids, CorruptRecord on bad crc."""
        with self._lock:
            rows = self.catalog.get(sample_ids)
            missing = [sid for sid in sample_ids if sid not in rows]
            if missing:
                raise KeyError(f"{len(missing)} unknown sample ids, e.g. {missing[0]!r}")
            return self._read_rows([rows[sid] for sid in sample_ids])

    def sample_ids(self, experience: int | None = None, probe: bool | None = None, after: int = 0) -> list[str]:
        return self.catalog.ids(experience, probe, after)

    def iter_records(
        self, experience: int | None = None, probe: bool | None = None, batch_size: int = 256,
        until: int | None = None,
    ) -> Iterator[tuple[list[SampleRow], list[bytes]]]:
        """Batches of (rows, encoded bytes) in insertion order, e.g. to re-embed everything;
        with ``until`` (a `catalog.last_rowid()`), only the rows stored up to then."""
        after = 0
        while True:
            with self._lock:
                rows, after = self.catalog.page(after, batch_size, experience, probe, until)
                if not rows:
                    return
                payloads = self._read_rows(rows)
            yield rows, payloads

    def stats(self) -> dict:
        """Record bytes and counts (total and per experience), shard files and their size."""
        files = list(self.shards.glob("shard-*.bin"))
        with self._lock:
            usage = sorted(self._usage.items())
        return {
            "bytes": sum(b for _, (_, b) in usage),
            "count": sum(n for _, (n, _) in usage),
            "max_bytes": self.max_bytes,
            "experiences": {exp: n for exp, (n, _) in usage},
            "shards": len(files),
            "disk_bytes": sum(p.stat().st_size for p in files),
        }
