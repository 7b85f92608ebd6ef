"""Sharded VectorIndex: fan-out search equals one index, shards grow, remove, publish and load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from replay.index import CURRENT_FILE, VectorIndex
from replay.index_options import IndexOptions

DIM = 16


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _shard_sizes(index: VectorIndex) -> list[int]:
    return [shard.ntotal for shard in index._table.shards]


def _assert_same_results(a: VectorIndex, b: VectorIndex, queries: np.ndarray, k: int) -> None:
    ra, rb = a.search(queries, k), b.search(queries, k)
    assert ra.sample_ids == rb.sample_ids
    np.testing.assert_allclose(ra.scores, rb.scores, atol=1e-5)
    assert np.array_equal(ra.experiences, rb.experiences)


def test_sharded_exact_search_equals_one_exact_index(tmp_path):
    x, queries = _vectors(700, 0), _vectors(40, 1)
    ids, exps = _ids("s", 700), [i % 5 for i in range(700)]
    one = VectorIndex(tmp_path / "one", DIM, IndexOptions(exact_max=10_000))
    one.add(1, x, ids, exps)
    # past exact_max in all, but each shard stays under it: still exact
    sharded = VectorIndex(tmp_path / "sharded", DIM, IndexOptions(exact_max=300, shard_max=100))
    sharded.add(1, x[:64], ids[:64], exps[:64])
    table = sharded._table
    for start in range(64, 700, 64):  # live adds, in daemon-sized batches
        sharded.add(1, x[start : start + 64], ids[start : start + 64], exps[start : start + 64])
    assert sharded._table is table  # grown in place, never rebuilt
    assert one.kind == "flat" and sharded.kind == "shards:flat" and sharded.size == 700
    assert len(_shard_sizes(sharded)) == 7 and max(_shard_sizes(sharded)) <= 100
    _assert_same_results(one, sharded, queries, 50)
    _assert_same_results(one, sharded, queries, 800)  # k past the size: same padding

    built = sharded.build(2, x, ids, exps)  # a build spreads evenly over ceil(700 / 100) shards
    assert sorted(shard.ntotal for shard in built.table.shards) == [100] * 7
    sharded.swap(built)
    _assert_same_results(one, sharded, queries, 50)


def test_adding_past_shard_max_opens_shards_and_fills_the_emptiest(tmp_path):
    index = VectorIndex(tmp_path, DIM, IndexOptions(exact_max=10_000, shard_max=100))
    x, ids = _vectors(400, 2), _ids("s", 400)
    index.add(1, x[:100], ids[:100], [0] * 100)
    assert index.kind == "flat" and _shard_sizes(index) == [100]
    index.add(1, x[100:130], ids[100:130], [0] * 30)
    assert index.kind == "shards:flat" and _shard_sizes(index) == [100, 30]
    index.remove(ids[:50])
    index.add(1, x[130:160], ids[130:160], [0] * 30)  # the emptier shard first, then both evenly
    assert _shard_sizes(index) == [55, 55]
    index.add(1, x[160:400], ids[160:400], [0] * 240)  # 90 fit: two more shards, all evened out
    assert sorted(_shard_sizes(index)) == [87, 87, 88, 88] and index.size == 350
    result = index.search(x[50:400], 1)
    assert [row[0] for row in result.sample_ids] == ids[50:400]


def test_remove_across_shards(tmp_path):
    x, ids = _vectors(500, 3), _ids("s", 500)
    one = VectorIndex(tmp_path / "one", DIM, IndexOptions(exact_max=10_000))
    sharded = VectorIndex(tmp_path / "sharded", DIM, IndexOptions(exact_max=10_000, shard_max=100))
    for index in (one, sharded):
        index.add(1, x, ids, [1] * 500)
    gone = ids[::7] + ["unknown"]  # some from every shard
    assert one.remove(gone) == sharded.remove(gone) == 72
    assert sharded.size == 428 and sum(_shard_sizes(sharded)) == 428
    found = {sid for row in sharded.search(x, 20).sample_ids for sid in row}
    assert not found & set(gone)
    _assert_same_results(one, sharded, x[:30], 25)
    assert sharded.add(1, x[:1], ids[:1], [2]) == 1  # a removed id can come back
    assert sharded.search(x[:1], 1).sample_ids[0][0] == "s0"


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_shards_past_exact_max(tmp_path, kind):
    x, ids = _vectors(1200, 4), _ids("s", 1200)
    index = VectorIndex(tmp_path, DIM, IndexOptions(exact_max=150, kind=kind, nprobe=64, shard_max=400))
    index.add(1, x[:200], ids[:200], [0] * 200)  # one shard crosses exact_max: converted
    assert index.kind == kind
    index.add(1, x[200:], ids[200:], [1] * 1000)  # past shard_max: shards open, same kind
    assert index.kind == f"shards:{kind}" and len(_shard_sizes(index)) == 3
    hits = index.search(x, 1).sample_ids
    assert np.mean([row[0] == sid for row, sid in zip(hits, ids, strict=True)]) > 0.95
    gone = ids[::3]
    assert index.remove(gone) == 400
    found = {sid for row in index.search(x, 10).sample_ids for sid in row}
    assert not found & set(gone) and index.size == 800


def test_sharded_ivf_returns_what_one_ivf_returns(tmp_path):
    """IVF shards share one trained quantizer, so fanning out probes the same lists."""
    x, queries = _vectors(1000, 5), _vectors(30, 6)
    one = VectorIndex(tmp_path / "one", DIM, IndexOptions(exact_max=100, nprobe=4))
    sharded = VectorIndex(tmp_path / "sharded", DIM, IndexOptions(exact_max=100, nprobe=4, shard_max=300))
    for index in (one, sharded):
        index.swap(index.build(1, x, _ids("s", 1000), [0] * 1000))
    assert one.kind == "ivf" and sharded.kind == "shards:ivf"
    _assert_same_results(one, sharded, queries, 20)


def test_sharded_save_load_round_trip(tmp_path):
    x, ids = _vectors(350, 7), _ids("s", 350)
    index = VectorIndex(tmp_path, DIM, IndexOptions(exact_max=10_000, shard_max=100))
    index.add(3, x, ids, [i % 4 for i in range(350)])
    index.remove(ids[:10])
    index.save()
    current = tmp_path / "index" / (tmp_path / "index" / CURRENT_FILE).read_text()
    manifest = json.loads((current / "manifest.json").read_text())
    files = {p.name for p in current.iterdir()} - {"manifest.json"}
    assert files == {"ids.json", "shard-000.faiss", "shard-001.faiss", "shard-002.faiss",
                     "shard-003.faiss"}
    assert set(manifest["sha256"]) == files and manifest["kind"] == "shards:flat"

    fresh = VectorIndex(tmp_path, DIM, IndexOptions(exact_max=10_000, shard_max=100))
    assert fresh.load() == 3 and fresh.size == 340 and fresh.kind == "shards:flat"
    _assert_same_results(index, fresh, x, 30)
    assert fresh.add(3, x[:10], ids[:10], [9] * 10) == 10  # labels stay unique after a load
    assert fresh.search(x[:10], 1).sample_ids == [[sid] for sid in ids[:10]]

    fresh.save()
    latest = tmp_path / "index" / (tmp_path / "index" / CURRENT_FILE).read_text()
    (latest / "shard-001.faiss").write_bytes(b"torn")
    assert VectorIndex(tmp_path, DIM).load() is None  # older generations were pruned


def test_unsharded_directories_load_and_then_shard(tmp_path):
    x, ids = _vectors(150, 8), _ids("s", 150)
    old = VectorIndex(tmp_path, DIM)
    old.add(1, x[:80], ids[:80], [0] * 80)
    old.save()
    current = tmp_path / "index" / (tmp_path / "index" / CURRENT_FILE).read_text()
    assert {p.name for p in current.iterdir()} == {"index.faiss", "ids.json", "manifest.json"}

    index = VectorIndex(tmp_path, DIM, IndexOptions(shard_max=100))
    assert index.load() == 1 and index.kind == "flat"
    index.add(1, x[80:], ids[80:], [0] * 70)
    assert index.kind == "shards:flat" and _shard_sizes(index) == [80, 70]
    index.save()
    assert VectorIndex(tmp_path, DIM).load() == 1  # a sharded directory loads without shard_max
