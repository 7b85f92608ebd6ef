"""SampleStore: round trip, crc, crash recovery, budgeted per-experience eviction, compaction."""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pytest

from replay.catalog import Catalog
from replay.store import HEADER, CorruptRecord, SampleStore, fair_share


def _payloads(prefix: str, n: int, size: int = 1000) -> tuple[list[str], list[bytes]]:
    rng = np.random.default_rng(zlib.crc32(prefix.encode()))
    return [f"{prefix}-{i}" for i in range(n)], [rng.bytes(size) for _ in range(n)]


def _add(store: SampleStore, prefix: str, n: int, experience: int, **kw) -> tuple[list, list]:
    ids, data = _payloads(prefix, n)
    store.add(ids, data, experience, ["dom"] * n, **kw)
    return ids, data


def _consistent(store: SampleStore, reopened: bool = False) -> None:
    """Every catalog row is readable; after a reopen, shards end exactly at their last record."""
    rows = store.catalog.all_ids_with_positions()
    assert len(store.read([sid for sid, *_ in rows])) == len(rows)
    ends = {shard: end for shard, (end, _, _) in store.catalog.shard_extents().items()}
    for path in store.shards.glob("shard-*.bin"):
        size, end = path.stat().st_size, ends.get(path.name, 0)
        assert size == end if reopened else size >= end


def test_add_read_duplicates_and_metadata(tmp_path):
    store = SampleStore(tmp_path, max_bytes=1 << 30)
    ids, data = _payloads("x", 10)
    added = store.add(
        ids + ids[:2],
        data + data[:2],
        1,
        ["a"] * 12,
        labels=["cat"] * 12,
        probes=[True] + [False] * 11,
    )
    assert added == 10
    assert store.add(ids[:3], data[:3], 2, ["a"] * 3) == 0
    assert store.read(ids[::-1]) == data[::-1]
    assert store.sample_ids(probe=True) == ["x-0"]
    assert store.sample_ids(experience=1) == ids and store.sample_ids(experience=2) == []
    stats = store.stats()
    assert stats["count"] == 10 and stats["experiences"] == {1: 10}
    assert stats["bytes"] == stats["disk_bytes"] == 10 * (1000 + HEADER.size)
    row = store.catalog.get(["x-0"])["x-0"]
    assert (row.label, row.probe, row.domain, row.length) == ("cat", True, "a", 1000)
    assert store.catalog.domains_by_experience() == {1: {"a": 10}}
    with pytest.raises(KeyError):
        store.read(["nope"])


def test_iter_records_pages_through_everything(tmp_path):
    store = SampleStore(tmp_path, max_bytes=1 << 30)
    ids1, data1 = _add(store, "a", 7, 1)
    ids2, data2 = _add(store, "b", 5, 2, probes=[True] * 5)
    batches = list(store.iter_records(batch_size=4))
    assert [len(rows) for rows, _ in batches] == [4, 4, 4]
    assert [r.sample_id for rows, _ in batches for r in rows] == ids1 + ids2
    assert [p for _, payloads in batches for p in payloads] == data1 + data2
    only = [r.sample_id for rows, _ in store.iter_records(experience=2, probe=True) for r in rows]
    assert only == ids2


def test_crc_mismatch_is_detected(tmp_path):
    store = SampleStore(tmp_path, max_bytes=1 << 30)
    ids, _ = _add(store, "x", 3, 1)
    row = store.catalog.get([ids[1]])[ids[1]]
    with open(store.shards / row.shard, "r+b") as f:
        f.seek(row.offset + 10)
        f.write(b"\xff\x00\xff")
    with pytest.raises(CorruptRecord):
        store.read([ids[1]])
    assert len(store.read([ids[0], ids[2]])) == 2


def test_crash_before_catalog_commit_leaves_only_a_tail_that_reopen_cuts(tmp_path):
    store = SampleStore(tmp_path, max_bytes=1 << 30)
    ids, data = _add(store, "x", 5, 1)
    _, orphan = _payloads("orphan", 3)
    store._append(orphan)  # bytes fsynced, then the process dies before the catalog commit
    with open(store.shards / "shard-000001.bin", "ab") as f:
        f.write(HEADER.pack(b"TLSR", 5000, 0) + b"torn")  # and a half-written record
    store.close()

    reopened = SampleStore(tmp_path, max_bytes=1 << 30)
    _consistent(reopened, reopened=True)
    assert reopened.read(ids) == data and reopened.stats()["count"] == 5
    more_ids, more = _add(reopened, "y", 4, 2)
    assert reopened.read(more_ids) == more
    _consistent(reopened)


def test_rows_pointing_past_a_shortened_shard_are_dropped_on_open(tmp_path):
    store = SampleStore(tmp_path, max_bytes=1 << 30)
    ids, data = _add(store, "x", 5, 1)
    store.close()
    path = tmp_path / "samples" / "shard-000001.bin"
    os.truncate(path, path.stat().st_size - 10)  # lost bytes under committed rows
    reopened = SampleStore(tmp_path, max_bytes=1 << 30)
    assert reopened.sample_ids() == ids[:4]
    assert reopened.read(ids[:4]) == data[:4]
    _consistent(reopened, reopened=True)


def test_fair_share_water_fills():
    assert fair_share({1: 10, 2: 100, 3: 100}, 110) == 50
    assert fair_share({1: 10, 2: 20}, 100) == float("inf")
    assert fair_share({1: 60, 2: 60, 3: 60}, 90) == 30


def test_eviction_keeps_budget_and_balances_experiences(tmp_path):
    record = 1000 + HEADER.size
    evicted: list[str] = []
    store = SampleStore(
        tmp_path, max_bytes=60 * record, seed=1, shard_bytes=16 * record, on_evict=evicted.extend
    )
    _add(store, "e0", 100, 0)
    assert store.stats()["count"] == 57  # evicts down to the 95% low-water mark
    _add(store, "e1", 100, 1, probes=[i < 5 for i in range(100)])
    _add(store, "e2", 10, 2)
    stats = store.stats()
    assert stats["bytes"] <= store.max_bytes
    assert stats["experiences"] == {0: 23, 1: 23, 2: 10}  # max-min fair split of 57
    assert set(store.sample_ids(experience=1, probe=True)) == {f"e1-{i}" for i in range(5)}
    assert len(evicted) == 210 - 56 and not store.catalog.get(evicted)
    # survivors are a spread-out random subset, not the newest or oldest ones
    kept = sorted(int(s.split("-")[1]) for s in store.sample_ids(experience=0))
    assert kept[0] < 30 and kept[-1] > 70
    _consistent(store)


def test_compaction_rewrites_mostly_dead_shards(tmp_path):
    record = 1000 + HEADER.size
    store = SampleStore(tmp_path, max_bytes=40 * record, seed=2, shard_bytes=10 * record)
    for exp in range(6):
        _add(store, f"e{exp}", 40, exp)
    stats = store.stats()
    assert stats["bytes"] <= store.max_bytes and stats["count"] == 36
    assert stats["disk_bytes"] <= 2 * stats["bytes"] + store.shard_bytes
    _consistent(store)


def test_crash_between_compaction_commit_and_unlink_is_cleaned_on_open(tmp_path):
    record = 1000 + HEADER.size
    store = SampleStore(tmp_path, max_bytes=12 * record, seed=3, shard_bytes=10 * record)
    _add(store, "a", 10, 0)  # fills shard 1
    saved = tmp_path / "saved-shard"
    shutil.copy(store.shards / "shard-000001.bin", saved)
    _add(store, "b", 10, 1)  # "a" keeps 5 of 10: half live, not compacted yet
    assert (store.shards / "shard-000001.bin").exists()
    _add(store, "c", 10, 2)  # "a" keeps 3 of 10: shard 1 is compacted away
    assert not (store.shards / "shard-000001.bin").exists()
    store.close()
    shutil.copy(saved, tmp_path / "samples" / "shard-000001.bin")  # as if unlink never ran
    reopened = SampleStore(tmp_path, max_bytes=12 * record)
    assert not (reopened.shards / "shard-000001.bin").exists()
    _consistent(reopened, reopened=True)
    assert reopened.stats()["experiences"] == {0: 3, 1: 3, 2: 3}


def test_catalog_is_usable_from_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    store = SampleStore(tmp_path, max_bytes=1 << 30)
    ids, _ = _add(store, "x", 50, 1)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda sid: store.read([sid]), ids))
    assert len(results) == 50
    assert Catalog(tmp_path / "catalog.sqlite").count() == 50


def test_catalog_names_experiences(tmp_path):
    from replay.catalog import Catalog

    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.name_experience(7, "exp-7", {"boundary": "drift", "offsets": {"0": [100, 899]}})
    catalog.name_experience(7, "exp-7", {"boundary": "drift", "offsets": {"0": [100, 900]}})  # replaced
    catalog.close()
    assert Catalog(tmp_path / "catalog.sqlite").experience_names() == {
        7: {"name": "exp-7", "boundary": "drift", "offsets": {"0": [100, 900]}}}


def test_hand_over_moves_the_last_trained_rows_and_the_probes_among_them(tmp_path):
    store = SampleStore(tmp_path, max_bytes=1 << 30)
    early, _ = _add(store, "early", 6, 1)
    early_probe, _ = _add(store, "early-probe", 1, 1, probes=[True])
    late, _ = _add(store, "late", 4, 1)
    late_probe, _ = _add(store, "late-probe", 2, 1, probes=[True, True])
    _add(store, "other", 3, 5)
    before = store.stats()["experiences"]
    filed = store.hand_over(1, 2, trained=4)
    assert filed == dict.fromkeys(late + late_probe, 2)  # the last 4 trained rows, then the probes after the first
    assert set(store.sample_ids(experience=1)) == set(early + early_probe)
    assert store.sample_ids(experience=2) == late + late_probe
    assert store.stats()["experiences"] == {1: before[1] - 6, 2: 6, 5: 3}  # the budget's shares follow
    assert store.hand_over(1, 2, trained=0) == {} and store.hand_over(8, 9, trained=3) == {}


def test_a_replayed_hand_over_files_the_tail_anew_and_gives_back_what_it_no_longer_covers(tmp_path):
    store = SampleStore(tmp_path, max_bytes=1 << 30)
    ids, _ = _add(store, "s", 10, 1)
    store.catalog.name_experience(1, "exp-1", {"images_after_change": 4})
    assert store.catalog.pending_handovers() == [(1, 4)]
    store.hand_over(1, 2, trained=4)
    assert store.catalog.pending_handovers() == []  # marked in the same transaction
    assert store.hand_over(1, 2, trained=4) == {}  # applied twice: nothing changes
    assert store.hand_over(1, 2, trained=2) == dict.fromkeys(ids[6:8], 1)  # a replayed cut estimated later
    assert store.sample_ids(experience=2) == ids[8:]
    assert store.hand_over(1, 2, trained=50) == dict.fromkeys(ids[:8], 2)  # more than it holds: all of it
