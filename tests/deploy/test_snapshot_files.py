"""SnapshotShelf: where snapshots live, names, publishing one, reading, serving and listing them."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import learners.snapshot as weights
from deploy.http_api import error_status
from deploy.snapshot_errors import SnapshotError
from deploy.snapshot_files import (
    MODEL_FILE,
    NAME_PATTERN,
    SNAPSHOT_FILES,
    SnapshotShelf,
    check_name,
    default_name,
)
from learners.backbones import ResNet18

MODEL_BYTES = b"not really a safetensors file"


def write_model(folder: Path) -> str:
    """A stand-in for `learners.snapshot.save_backbone`: one file, its 'digest'."""
    (folder / MODEL_FILE).write_bytes(MODEL_BYTES)
    return "digest-of-model"


def shelf_at(tmp_path: Path) -> SnapshotShelf:
    return SnapshotShelf.in_state_dir(tmp_path).prepare()


def status_of(call) -> int:
    with pytest.raises(SnapshotError) as err:
        call()
    return error_status(err.value)


def test_names():
    for good in ("a", "snap-1", "Task_2.v3", "0" + "x" * 63):
        assert check_name(good) == good
    for bad in ("", "../escape", "a/b", ".hidden", "-dash", "x" * 65, "snap\n", None, 3):
        assert status_of(lambda bad=bad: check_name(bad)) == 400
    name = default_name()
    assert re.fullmatch(r"snap-\d{8}-\d{6}-[0-9a-f]{6}", name) and NAME_PATTERN.fullmatch(name)
    assert default_name() != default_name()


def test_the_shelf_lives_in_the_state_dir_and_prepare_cleans_up(tmp_path):
    shelf = SnapshotShelf.in_state_dir(tmp_path)
    assert shelf.root == tmp_path / "snapshots"
    assert not shelf.root.exists()  # making one touches nothing
    assert shelf.newest(20) == ([], 0)
    assert shelf.prepare() is shelf
    assert stat.S_IMODE(shelf.root.stat().st_mode) == 0o700
    shelf.publish("kept", {"name": "kept"}, write_model)
    (shelf.root / ".tmp-crashed-1234").mkdir()
    (shelf.root / ".tmp-crashed-1234" / MODEL_FILE).write_bytes(b"half")
    SnapshotShelf(shelf.root).prepare()
    assert sorted(p.name for p in shelf.root.iterdir()) == ["kept"]


def test_publish_then_describe_and_serve(tmp_path):
    shelf = shelf_at(tmp_path)
    assert not shelf.exists("task")
    manifest = shelf.publish("task", {"name": "task", "strategy": "route"}, write_model)
    assert manifest["files"] == {MODEL_FILE: "digest-of-model"} and manifest["strategy"] == "route"
    assert isinstance(manifest["created_at"], float)
    assert shelf.exists("task")
    assert shelf.describe("task") == manifest
    written = (shelf.root / "task" / "manifest.json").read_text()
    assert written == json.dumps(manifest, indent=2, sort_keys=True)
    assert shelf.file_path("task", MODEL_FILE).read_bytes() == MODEL_BYTES
    assert shelf.file_path("task", "manifest.json").read_text() == written
    assert set(SNAPSHOT_FILES) == {MODEL_FILE, "manifest.json"}
    assert sorted(p.name for p in shelf.root.iterdir()) == ["task"]  # no staging left


def test_a_taken_name_or_a_failed_write_leaves_nothing(tmp_path):
    shelf = shelf_at(tmp_path)
    first = shelf.publish("taken", {"name": "taken"}, write_model)
    assert status_of(lambda: shelf.publish("taken", {"name": "again"}, write_model)) == 409
    assert shelf.describe("taken") == first

    def broken(folder: Path) -> str:
        (folder / MODEL_FILE).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        shelf.publish("broken", {"name": "broken"}, broken)
    assert sorted(p.name for p in shelf.root.iterdir()) == ["taken"]
    assert status_of(lambda: shelf.publish("../out", {}, write_model)) == 400
    assert not (tmp_path / "out").exists()


def test_bad_names_and_missing_files_are_400_and_404(tmp_path):
    shelf = shelf_at(tmp_path)
    shelf.publish("there", {"name": "there"}, write_model)
    (tmp_path / "checkpoints" / "exp-000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "exp-000001" / "manifest.json").write_text("{}")
    assert status_of(lambda: shelf.describe("../checkpoints/exp-000001")) == 400
    assert status_of(lambda: shelf.exists("../checkpoints")) == 400
    assert status_of(lambda: shelf.describe("never-made")) == 404
    assert status_of(lambda: shelf.file_path("never-made", MODEL_FILE)) == 404
    for filename in ("optimizer.pt", "../manifest.json", "", "../../checkpoints/exp-000001/manifest.json"):
        assert status_of(lambda filename=filename: shelf.file_path("there", filename)) == 404
    (shelf.root / "there" / MODEL_FILE).unlink()
    assert status_of(lambda: shelf.file_path("there", MODEL_FILE)) == 404


def test_newest_lists_by_folder_time_then_created_at(tmp_path):
    shelf = shelf_at(tmp_path)
    for i, name in enumerate(("old", "mid", "new")):
        shelf.publish(name, {"name": name, "strategy": "route"}, write_model)
        manifest_path = shelf.root / name / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["created_at"] = 1000.0 + i
        manifest_path.write_text(json.dumps(manifest))
        os.utime(shelf.root / name, (1000 + i, 1000 + i))
    (shelf.root / "no-manifest").mkdir()
    (shelf.root / "unnamed").mkdir()
    (shelf.root / "unnamed" / "manifest.json").write_text(json.dumps({"created_at": 999.0}))
    (shelf.root / "not-a-dict").mkdir()
    (shelf.root / "not-a-dict" / "manifest.json").write_text("[1, 2]")
    (shelf.root / ".tmp-writing-1").mkdir()  # being published: not a snapshot
    for folder, when in (("no-manifest", 900), ("unnamed", 800), ("not-a-dict", 700)):
        os.utime(shelf.root / folder, (when, when))

    listed, count = shelf.newest(20)
    assert count == 6
    assert [m["name"] for m in listed] == ["new", "mid", "old", "unnamed"]
    assert listed[0]["strategy"] == "route" and listed[0]["files"] == {MODEL_FILE: "digest-of-model"}
    listed, count = shelf.newest(2)  # the two newest folders only
    assert [m["name"] for m in listed] == ["new", "mid"] and count == 6


def test_a_real_backbone_round_trips(tmp_path):
    assert (MODEL_FILE, "manifest.json") == (weights.MODEL_FILE, weights.MANIFEST_FILE)
    backbone = ResNet18(width=8, small_stem=True)
    shelf = shelf_at(tmp_path)
    shelf.publish("real", {"name": "real", "backbone": weights.backbone_spec(backbone)},
                  lambda folder: weights.save_backbone(backbone, folder))
    loaded = weights.load_snapshot(shelf.root / "real")  # checks the manifest's sha256 of the weights
    assert loaded.state_dict().keys() == backbone.state_dict().keys()


def test_the_shelf_and_the_status_page_stay_stdlib_only():
    code = ("import sys, deploy.snapshot_files, deploy.status_page; "
            "print(sorted({'torch', 'numpy', 'safetensors'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
