"""VectorIndex: cosine search, removal, exact→IVF/HNSW switch, versioned publish/swap/load."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from replay.index import CURRENT_FILE, VectorIndex
from replay.index_options import IndexOptions

DIM = 16


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _self_recall(index: VectorIndex, x: np.ndarray, ids: list[str]) -> float:
    result = index.search(x, 1)
    return float(np.mean([row[0] == sid for row, sid in zip(result.sample_ids, ids, strict=True)]))


def test_flat_search_returns_cosine_neighbours_with_ids_and_experiences(tmp_path):
    index = VectorIndex(tmp_path, DIM)
    x = _vectors(50, 0)
    assert index.add(1, x, _ids("a", 50), [i % 3 for i in range(50)]) == 50
    assert index.add(1, x[:5], _ids("a", 5), [0] * 5) == 0  # duplicates are skipped
    result = index.search(x[:4] * 7.0, 3)  # scale does not matter: cosine
    assert [row[0] for row in result.sample_ids] == _ids("a", 4)
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(result.scores, axis=1) <= 1e-6)
    assert result.experiences[:, 0].tolist() == [0, 1, 2, 0]
    assert index.kind == "flat" and index.size == 50 and index.current_version == 1

    padded = index.search(x[:2], 60)
    assert padded.scores.shape == (2, 60) and np.isneginf(padded.scores[:, 50:]).all()
    assert padded.experiences[:, 50:].tolist() == [[-1] * 10] * 2
    assert padded.sample_ids[0][50:] == [""] * 10
    with pytest.raises(ValueError):
        index.add(2, x, _ids("b", 50), [0] * 50)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_switches_from_exact_past_exact_max_and_removes(tmp_path, kind):
    index = VectorIndex(tmp_path, DIM, IndexOptions(exact_max=300, kind=kind, nprobe=64))
    x = _vectors(600, 1)
    ids = _ids("s", 600)
    index.add(1, x[:300], ids[:300], [1] * 300)
    assert index.kind == "flat"
    index.add(1, x[300:], ids[300:], [2] * 300)
    assert index.kind == kind and index.size == 600
    assert _self_recall(index, x, ids) > 0.95

    gone = ids[:100]
    assert index.remove(gone + ["unknown"]) == 100
    found = {sid for row in index.search(x[:100], 10).sample_ids for sid in row}
    assert not found & set(gone)
    assert index.size == 500 and _self_recall(index, x[100:], ids[100:]) > 0.95


def test_hnsw_rebuilds_once_tombstones_pile_up(tmp_path):
    index = VectorIndex(tmp_path, DIM, IndexOptions(exact_max=100, kind="hnsw"))
    x = _vectors(400, 2)
    ids = _ids("s", 400)
    index.add(1, x, ids, [0] * 400)
    index.remove(ids[:50])
    assert index.kind == "hnsw" and len(index._table.dead) == 50
    index.remove(ids[50:150])  # 150 / 400 dead > 25%: rebuilt from the live vectors
    assert index.kind == "hnsw" and not index._table.dead and index.size == 250
    assert _self_recall(index, x[150:], ids[150:]) > 0.95


def test_build_and_swap_while_searching_from_another_thread(tmp_path):
    index = VectorIndex(tmp_path, DIM)
    x1, x2 = _vectors(300, 3), _vectors(300, 4)
    index.add(1, x1, _ids("a", 300), [1] * 300)
    index.save()
    assert (tmp_path / "index" / CURRENT_FILE).read_text() == "v000001.g000001"

    seen: set[int] = set()
    errors: list[str] = []
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            exps = set(index.search(x1[:8], 20).experiences.ravel().tolist())
            if len(exps) != 1:
                errors.append(f"mixed or empty result {exps}")
            seen.update(exps)

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        built = index.build(2, x2[:250], _ids("b", 250), [2] * 250)
        assert index.current_version == 1 and index.size == 300  # live index untouched
        assert built.add(x2[250:], _ids("b", 300)[250:], [2] * 50) == 50
        index.swap(built)
        stop.wait(0.2)
    finally:
        stop.set()
        thread.join()
    assert not errors and seen == {1, 2}
    assert index.current_version == 2 and index.size == 300
    assert (tmp_path / "index" / CURRENT_FILE).read_text() == "v000002.g000001"
    assert index.sizes_by_version() == {1: 300, 2: 300}

    index.swap(index.build(3, x1[:10], _ids("c", 10), [3] * 10))
    names = sorted(p.name for p in (tmp_path / "index").iterdir() if p.is_dir())
    assert names == ["v000002.g000001", "v000003.g000001"]  # older than previous: pruned


def test_save_load_round_trip_and_generations(tmp_path):
    index = VectorIndex(tmp_path, DIM)
    x = _vectors(100, 5)
    index.add(7, x[:60], _ids("a", 60), [4] * 60)
    index.save()
    index.add(7, x[60:], _ids("a", 100)[60:], [5] * 40)
    index.remove(["a0", "a1"])
    index.save()
    dirs = sorted(p.name for p in (tmp_path / "index").iterdir() if p.is_dir())
    assert dirs == ["v000007.g000002"]

    fresh = VectorIndex(tmp_path, DIM)
    assert fresh.load() == 7 and fresh.size == 98
    a, b = index.search(x, 5), fresh.search(x, 5)
    assert a.sample_ids == b.sample_ids and np.array_equal(a.experiences, b.experiences)
    assert fresh.add(7, x[:2], ["a0", "a1"], [4, 4]) == 2  # removed ids can come back


def test_torn_directories_are_ignored(tmp_path):
    index = VectorIndex(tmp_path, DIM)
    x = _vectors(40, 6)
    index.add(1, x, _ids("a", 40), [1] * 40)
    index.save()
    index.swap(index.build(2, x, _ids("b", 40), [2] * 40))
    root = tmp_path / "index"
    (root / "v000003.g000001").mkdir()  # renamed into place but missing files
    (root / "v000003.g000001" / "manifest.json").write_text("{not json")
    (root / ".tmp-v000004.g000001-abc").mkdir()
    assert VectorIndex(tmp_path, DIM).load() == 2

    # CURRENT names a directory whose files no longer match their manifest
    (root / "v000002.g000001" / "ids.json").write_text("{}")
    fallback = VectorIndex(tmp_path, DIM)
    assert fallback.load() == 1 and fallback.search(x[:1], 1).experiences[0, 0] == 1
    assert VectorIndex(tmp_path, DIM + 1).load() is None  # other dimension: nothing valid
    assert VectorIndex(tmp_path / "empty", DIM).load() is None


def test_hand_over_files_indexed_samples_under_another_experience(tmp_path):
    index = VectorIndex(tmp_path, DIM)
    x = _vectors(10, 0)
    index.add(1, x, _ids("a", 10), [1] * 10)
    assert index.hand_over({**dict.fromkeys(_ids("a", 10)[6:], 2), "unknown": 2}) == 4
    assert index.search(x, 1).experiences[:, 0].tolist() == [1] * 6 + [2] * 4
    index.save()
    reloaded = VectorIndex(tmp_path, DIM)
    reloaded.load()
    assert reloaded.search(x, 1).experiences[:, 0].tolist() == [1] * 6 + [2] * 4  # published as filed
