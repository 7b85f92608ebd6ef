"""On-disk IVF lists: same results as in-RAM IVF, mapped (not read) on load, immutable and
verified publications, pruning, and no file outside the index root."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import faiss
import numpy as np
import pytest

from replay.index import CURRENT_FILE, MANIFEST_FILE, VectorIndex
from replay.index_options import IndexOptions

DIM = 16
OPTIONS = {"exact_max": 100, "nprobe": 4}


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _current(root: Path) -> Path:
    index = root / "index"
    return index / (index / CURRENT_FILE).read_text()


def _assert_same_results(a: VectorIndex, b: VectorIndex, queries: np.ndarray, k: int) -> None:
    ra, rb = a.search(queries, k), b.search(queries, k)
    assert ra.sample_ids == rb.sample_ids
    np.testing.assert_allclose(ra.scores, rb.scores, atol=1e-5)
    assert np.array_equal(ra.experiences, rb.experiences)


def _mapped(root: Path) -> set[str]:
    """Files under ``root`` this process has memory-mapped (Linux)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if str(root) in line}


def _assert_served_from_disk(index: VectorIndex) -> None:
    """Every shard's lists are read-only on-disk lists, mapped from the list files of CURRENT
    (the kernel names a mapped file by its path after the publication's rename); none in RAM."""
    table = index._table
    assert table.ondisk and all(shard.ntotal == 0 for shard in table.shards)
    for base in table.bases:
        lists = faiss.downcast_InvertedLists(base.invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only
    current = _current(index.dir.parent)
    assert _mapped(index.dir) == {str(path) for path in current.glob("*.ivfdata")}


def _files_match_manifest(directory: Path) -> bool:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    return all(
        hashlib.sha256((directory / name).read_bytes()).hexdigest() == sha
        and (directory / name).stat().st_size == manifest["bytes"][name]
        for name, sha in manifest["sha256"].items()
    )


@pytest.mark.parametrize("shard_max", [0, 400])
def test_ondisk_search_equals_in_ram_ivf(tmp_path, shard_max):
    x, more, queries = _vectors(1200, 0), _vectors(200, 1), _vectors(40, 2)
    ids, exps = _ids("s", 1200), [i % 3 for i in range(1200)]
    ram = VectorIndex(tmp_path / "ram", DIM, IndexOptions(shard_max=shard_max, **OPTIONS))
    disk = VectorIndex(tmp_path / "disk", DIM, IndexOptions(shard_max=shard_max, ondisk=True, **OPTIONS))
    for index in (ram, disk):
        index.swap(index.build(1, x, ids, exps))
    quantizers = [ram._table.shards[0].quantizer, disk._table.bases[0].quantizer]
    centroids = [q.reconstruct_n(0, q.ntotal) for q in quantizers]
    assert np.array_equal(*centroids)  # same training
    assert ram.kind == disk.kind == ("shards:ivf" if shard_max else "ivf")
    _assert_served_from_disk(disk)
    _assert_same_results(ram, disk, queries, 20)

    for index in (ram, disk):  # live changes: additions in RAM, removals as tombstones
        index.add(1, more, _ids("m", 200), [7] * 200)
        assert index.remove(ids[::5] + ["unknown"]) == 240
    assert sum(shard.ntotal for shard in disk._table.shards) == 200 and disk.size == 1160
    _assert_same_results(ram, disk, queries, 20)
    _assert_same_results(ram, disk, x[:50], 2000)  # k past the size: same padding
    found = {sid for row in disk.search(x, 10).sample_ids for sid in row}
    assert not found & set(ids[::5])

    for index in (ram, disk):
        index.save()
    _assert_served_from_disk(disk)  # additions folded in, tombstones compacted away
    assert disk._table.ntotal == disk.size == 1160 and not disk._table.dead
    _assert_same_results(ram, disk, queries, 20)


def test_publication_round_trip_maps_the_lists(tmp_path):
    x, ids = _vectors(1000, 3), _ids("s", 1000)
    index = VectorIndex(tmp_path, DIM, IndexOptions(shard_max=400, ondisk=True, **OPTIONS))
    index.add(2, x, ids, [i % 4 for i in range(1000)])
    index.remove(ids[:10])
    index.save()
    current = _current(tmp_path)
    manifest = json.loads((current / MANIFEST_FILE).read_text())
    names = {p.name for p in current.iterdir()} - {MANIFEST_FILE}
    shards = [f"shard-{i:03d}" for i in range(3)]
    assert names == {"ids.json"} | {f"{s}.faiss" for s in shards} | {f"{s}.ivfdata" for s in shards}
    assert set(manifest["sha256"]) == set(manifest["bytes"]) == names
    assert _files_match_manifest(current)

    fresh = VectorIndex(tmp_path, DIM, IndexOptions(**OPTIONS))  # the publication says on-disk, not the option
    assert fresh.load() == 2 and fresh.size == 990 and fresh.kind == "shards:ivf"
    _assert_served_from_disk(fresh)
    _assert_same_results(index, fresh, x, 10)


def test_remove_and_add_after_load_leave_the_publication_untouched(tmp_path):
    x, ids = _vectors(600, 4), _ids("s", 600)
    index = VectorIndex(tmp_path, DIM, IndexOptions(ondisk=True, **OPTIONS))
    index.swap(index.build(1, x[:500], ids[:500], [1] * 500))
    published = _current(tmp_path)

    fresh = VectorIndex(tmp_path, DIM, IndexOptions(ondisk=True, **OPTIONS))
    assert fresh.load() == 1
    assert fresh.remove(ids[:100]) == 100
    assert fresh.add(1, x[500:], ids[500:], [2] * 100) == 100
    assert fresh.add(1, x[:5], ids[:5], [3] * 5) == 5  # a removed id can come back
    assert fresh.size == 505
    result = fresh.search(x, 10)
    assert not {sid for row in result.sample_ids[5:100] for sid in row} & set(ids[5:100])
    assert [row[0] for row in result.sample_ids[100:]] == ids[100:]
    assert result.experiences[:5, 0].tolist() == [3] * 5
    assert _files_match_manifest(published)  # the mapped publication was never written

    fresh.save()
    assert fresh._table.ntotal == 505
    again = VectorIndex(tmp_path, DIM, IndexOptions(**OPTIONS))
    assert again.load() == 1
    _assert_same_results(fresh, again, x, 10)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_torn_list_files_are_refused(tmp_path, damage):
    x = _vectors(400, 5)
    index = VectorIndex(tmp_path, DIM, IndexOptions(ondisk=True, **OPTIONS))
    index.swap(index.build(1, x, _ids("a", 400), [1] * 400))
    index.swap(index.build(2, x, _ids("b", 400), [2] * 400))
    lists = _current(tmp_path) / "index.ivfdata"
    data = bytearray(lists.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        lists.write_bytes(data)
    elif damage == "truncate":
        lists.write_bytes(data[:-8])
    else:
        lists.unlink()
    fallback = VectorIndex(tmp_path, DIM, IndexOptions(**OPTIONS))
    assert fallback.load() == 1  # the previous version's publication
    assert fallback.search(x[:3], 1).experiences[:, 0].tolist() == [1, 1, 1]


def test_pruning_removes_old_list_files(tmp_path):
    x = _vectors(500, 6)
    index = VectorIndex(tmp_path, DIM, IndexOptions(ondisk=True, **OPTIONS))
    index.swap(index.build(1, x, _ids("a", 500), [1] * 500))
    index.swap(index.build(2, x, _ids("b", 500), [2] * 500))
    for i in range(3):
        index.remove([f"b{i}"])
        index.save()
    root = tmp_path / "index"
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert dirs == ["v000001.g000001", "v000002.g000004"]
    assert sorted(p.parent.name for p in root.rglob("*.ivfdata")) == dirs
    _assert_served_from_disk(index)  # maps only the newest: old lists are unmapped and gone


def test_in_ram_publication_moves_to_disk_at_the_next_save(tmp_path):
    x, queries = _vectors(400, 7), _vectors(20, 8)
    ram = VectorIndex(tmp_path, DIM, IndexOptions(**OPTIONS))
    ram.swap(ram.build(1, x, _ids("s", 400), [1] * 400))
    assert not list((tmp_path / "index").rglob("*.ivfdata"))

    disk = VectorIndex(tmp_path, DIM, IndexOptions(ondisk=True, **OPTIONS))
    assert disk.load() == 1 and disk._table.ondisk and disk._table.bases == [None]
    disk.save()
    _assert_served_from_disk(disk)
    _assert_same_results(ram, disk, queries, 10)


def test_nothing_is_written_outside_the_index_root(tmp_path, monkeypatch):
    cwd, scratch, state = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "state"
    for path in (cwd, scratch):
        path.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    x = _vectors(600, 9)
    index = VectorIndex(state, DIM, IndexOptions(ondisk=True, **OPTIONS))
    index.add(1, x[:300], _ids("s", 300), [0] * 300)  # flat → IVF, in RAM until published
    index.save()
    index.remove(_ids("s", 10))
    index.add(1, x[300:], _ids("t", 300), [0] * 300)
    index.save()
    index.swap(index.build(2, x, _ids("u", 600), [1] * 600))
    VectorIndex(state, DIM, IndexOptions(ondisk=True, **OPTIONS)).load()
    assert not list(cwd.iterdir()) and not list(scratch.iterdir())
    assert {p.name for p in state.iterdir()} == {"index"}


def test_ondisk_needs_ivf(tmp_path):
    with pytest.raises(ValueError, match="ivf"):
        VectorIndex(tmp_path, DIM, IndexOptions(kind="hnsw", ondisk=True))
