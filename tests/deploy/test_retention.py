"""Checkpoint retention: interval checkpoints pruned, newest N experiences kept, snapshot choices protected."""

import json

from deploy.checkpoints import write_checkpoint
from deploy.retention import directory_bytes, prune_checkpoints


def _ckpt(root, name):
    write_checkpoint(root, name, {"model.bin": lambda p: p.write_bytes(b"x" * 10)}, {})


def test_interval_checkpoints_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("exp-000000-step-000000010", "exp-000001", "exp-000001-step-000000020",
                 "exp-000001-step-000000030", "exp-000001-step-000000040"):
        _ckpt(root, name)
    removed = prune_checkpoints(tmp_path, None, "exp-000001-step-000000040")
    assert sorted(removed) == ["exp-000000-step-000000010", "exp-000001-step-000000020"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "exp-000001", "exp-000001-step-000000030", "exp-000001-step-000000040"]


def test_keep_newest_experiences_and_snapshot_choices(tmp_path):
    root = tmp_path / "checkpoints"
    for i in range(1, 7):
        _ckpt(root, f"exp-{i:06d}")
    snap = tmp_path / "snapshots" / "s1"
    snap.mkdir(parents=True)
    (snap / "manifest.json").write_text(json.dumps({"chosen_experience": 2}))
    prune_checkpoints(tmp_path, 3, "exp-000006")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "exp-000002", "exp-000004", "exp-000005", "exp-000006"]
    assert directory_bytes(tmp_path) > 0


def test_most_distinct_older_experience_is_kept(tmp_path):
    import numpy as np

    root = tmp_path / "checkpoints"
    for i in range(1, 7):
        _ckpt(root, f"exp-{i:06d}")
    common = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    centroids = {i: common for i in range(1, 7)}
    centroids[2] = np.array([0.0, 1.0, 0.0], dtype=np.float32)  # a domain unlike every other
    calls = []

    def lookup():
        calls.append(1)
        return centroids

    prune_checkpoints(tmp_path, 2, "exp-000006", keep_distinct=1, centroids=lookup)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["exp-000002", "exp-000005", "exp-000006"]
    assert calls == [1]
    prune_checkpoints(tmp_path, 5, "exp-000006", keep_distinct=1, centroids=lookup)
    assert calls == [1], "centroids are only computed when something would be dropped"


def test_index_centroids_by_experience(tmp_path):
    import numpy as np

    from replay.index import VectorIndex
    from replay.index_options import IndexOptions

    index = VectorIndex(tmp_path, 4, IndexOptions(exact_max=1000))
    rng = np.random.default_rng(0)
    a = np.array([1, 0, 0, 0], dtype=np.float32) + 0.01 * rng.standard_normal((20, 4)).astype(np.float32)
    b = np.array([0, 0, 1, 0], dtype=np.float32) + 0.01 * rng.standard_normal((20, 4)).astype(np.float32)
    index.add(1, np.vstack([a, b]), [f"s{i}" for i in range(40)], [1] * 20 + [2] * 20)
    centroids = index.centroids()
    assert set(centroids) == {1, 2}
    assert centroids[1] @ np.array([1, 0, 0, 0]) > 0.99
    assert centroids[2] @ np.array([0, 0, 1, 0]) > 0.99
