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
