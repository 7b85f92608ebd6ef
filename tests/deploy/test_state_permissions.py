"""The state dir (images, labels, trained ids, snapshots) is owner-only whatever the umask."""

from __future__ import annotations

import os
import stat

import pytest

from deploy.indexer import LOCK_FILE, lock_state
from deploy.snapshots import SnapshotEngine
from tests.snapshot_testkit import build_state, open_indexer, target_images


@pytest.fixture(autouse=True)
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_state_dir_and_its_lock_are_owner_only(tmp_path):
    state = tmp_path / "new" / "state"
    os.close(lock_state(state))
    assert mode(state) == 0o700 and mode(state / LOCK_FILE) == 0o600


def test_an_existing_world_readable_state_dir_is_made_owner_only(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    indexer = open_indexer(state)
    try:
        assert mode(state) == 0o700
    finally:
        indexer.stop()


def test_snapshot_folders_are_owner_only(tmp_path):
    state = build_state(tmp_path / "state", {1: "red"}, n=8, probes=0)
    state.chmod(0o755)  # e.g. made by hand before the first start
    engine = SnapshotEngine.open_offline(state, "cpu")
    try:
        engine.create(target_images("red", 2), strategy="route", name="mine")
    finally:
        engine.close()
    assert mode(state) == 0o700
    assert mode(state / "snapshots") == 0o700 and mode(state / "snapshots" / "mine") == 0o700
