"""Indexer: store writes, live indexing, re-embedding per encoder version, restart and eviction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploy.indexer import Encoder, decode_images, experience_checkpoints
from replay.index_options import IndexOptions
from replay.store import SampleStore
from streamer.limits import DecodeLimits
from tests.snapshot_testkit import (
    RES,
    colour_png,
    open_indexer,
    submit_colour,
    write_experience_checkpoint,
)


def _self_match(indexer, state_dir, version, sample_ids):
    """Top-1 neighbour ids and scores of stored samples embedded with checkpoint `version`."""
    encoder = Encoder.load(version, state_dir / "checkpoints" / f"exp-{version:06d}", "cpu")
    images, _ = decode_images(indexer.store.read(sample_ids), RES, DecodeLimits())
    result = indexer.index.search(encoder(images), 1)
    return [row[0] for row in result.sample_ids], result.scores[:, 0]


def test_new_encoder_indexes_non_probe_samples_then_live_adds_follow(tmp_path):
    reported = []
    indexer = open_indexer(tmp_path, metrics_callback=reported.append)
    try:
        red = submit_colour(indexer, 1, "red", 12, probes=3)
        assert indexer.flush(30)
        assert indexer.store.stats()["count"] == 15
        assert indexer.index_size() == 0 and indexer.encoder_version is None

        indexer.new_encoder(1, write_experience_checkpoint(tmp_path, 1, seed=1))
        assert indexer.flush(30)
        assert indexer.encoder_version == 1 and indexer.index.current_version == 1
        assert indexer.index_size() == 12  # probes are stored, never indexed
        assert indexer.sizes_by_version() == {1: 12} and reported[-1] == {1: 12}
        assert indexer.last_refresh_seconds > 0
        ids, scores = _self_match(indexer, tmp_path, 1, red[:5])
        assert ids == red[:5] and np.allclose(scores, 1.0, atol=1e-4)

        blue = submit_colour(indexer, 2, "blue", 6, probes=2)
        assert indexer.flush(30)
        assert indexer.index_size() == 18 and indexer.index.current_version == 1
        ids, _ = _self_match(indexer, tmp_path, 1, blue)
        assert ids == blue  # embedded by encoder 1 as they arrived
    finally:
        indexer.stop()


def test_restart_refreshes_to_the_latest_checkpoint_and_after_lost_additions(tmp_path):
    indexer = open_indexer(tmp_path)
    submit_colour(indexer, 1, "red", 10, probes=2)
    indexer.new_encoder(1, write_experience_checkpoint(tmp_path, 1, seed=1))
    assert indexer.flush(30)
    indexer.stop()

    # Crashed right after writing checkpoint 2, before its refresh: redone on start.
    write_experience_checkpoint(tmp_path, 2, seed=2)
    indexer = open_indexer(tmp_path)
    try:
        assert indexer.flush(30)
        assert indexer.encoder_version == 2 and indexer.sizes_by_version()[2] == 10
        assert (tmp_path / "index" / "CURRENT").read_text().startswith("v000002.")
    finally:
        indexer.stop()

    # Samples stored but never indexed (index additions lost in a crash): refreshed too.
    store = SampleStore(tmp_path, 1 << 30)
    store.add(["late-1", "late-2"], [colour_png("blue", 1), colour_png("blue", 2)], 2, ["blue"] * 2)
    store.close()
    indexer = open_indexer(tmp_path)
    try:
        assert indexer.flush(30)
        assert indexer.encoder_version == 2 and indexer.index_size() == 12
        ids, _ = _self_match(indexer, tmp_path, 2, ["late-1", "late-2"])
        assert ids == ["late-1", "late-2"]
    finally:
        indexer.stop()


def test_evicted_samples_leave_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr("deploy.indexer.EMBED_BATCH", 4)  # drain new batches between many pages
    one = len(colour_png("red", 0))
    indexer = open_indexer(tmp_path, store_max_bytes=20 * one)
    try:
        for start in range(0, 40, 8):  # over budget before any encoder exists
            submit_colour(indexer, 1, "red", 8, first_seed=start)
        # Batches stored (and evicting) while the refresh re-embeds, then after it.
        indexer.new_encoder(1, write_experience_checkpoint(tmp_path, 1, seed=1))
        for start in range(40, 80, 8):
            submit_colour(indexer, 1, "red", 8, first_seed=start)
        assert indexer.flush(30)
        stored = indexer.store.sample_ids(probe=False)
        assert 0 < len(stored) < 40
        assert indexer.index_size() == len(stored)
        ids, _ = _self_match(indexer, tmp_path, 1, stored)
        assert ids == stored
    finally:
        indexer.stop()


def test_only_experience_checkpoints_are_encoders(tmp_path):
    write_experience_checkpoint(tmp_path, 1, seed=1)
    write_experience_checkpoint(tmp_path, 3, seed=3)
    interval = tmp_path / "checkpoints" / "exp-000003-step-000000123"
    interval.mkdir()
    (interval / "manifest.json").write_text('{"kind": "interval"}')
    (tmp_path / "checkpoints" / ".tmp-exp-000004-1").mkdir()
    assert sorted(experience_checkpoints(tmp_path / "checkpoints")) == [1, 3]


def test_torn_checkpoint_is_refused(tmp_path):
    path = write_experience_checkpoint(tmp_path, 1, seed=1)
    with open(path / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="sha256"):
        Encoder.load(1, path, "cpu")


def test_loading_an_encoder_draws_nothing_from_the_global_rng(tmp_path):
    # The indexer's thread loads checkpoints beside training (and beside tests that seed torch's
    # RNG to build a model): building the backbone must not draw random init weights.
    path = write_experience_checkpoint(tmp_path, 1, seed=1)
    indexer = open_indexer(tmp_path)
    try:
        torch.manual_seed(123)
        indexer.new_encoder(1, path)
        assert indexer.flush(60)
        drawn = torch.rand(3)
    finally:
        indexer.stop()
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(3))


def test_hand_over_files_an_experience_tail_under_the_next_one_after_earlier_batches(tmp_path):
    indexer = open_indexer(tmp_path)
    try:
        red = submit_colour(indexer, 1, "red", 8)
        indexer.new_encoder(1, write_experience_checkpoint(tmp_path, 1, seed=1))
        assert indexer.flush(30)
        blue = submit_colour(indexer, 1, "blue", 4, probes=1)  # after a change point, before the cut
        indexer.hand_over(1, 2, trained=4)  # queued behind the batches above, never ahead of them
        assert indexer.flush(30)
        assert indexer.store.sample_ids(experience=1) == red
        assert indexer.store.sample_ids(experience=2) == [*blue, "blue-1-4"]  # the probe among them too
        encoder = Encoder.load(1, tmp_path / "checkpoints" / "exp-000001", "cpu")
        images, _ = decode_images(indexer.store.read(red + blue), RES, DecodeLimits())
        assert indexer.index.search(encoder(images), 1).experiences[:, 0].tolist() == [1] * 8 + [2] * 4
        indexer.new_encoder(2, write_experience_checkpoint(tmp_path, 2, seed=2))  # re-embedded from the store
        assert indexer.flush(30) and indexer.encoder_version == 2
        encoder = Encoder.load(2, tmp_path / "checkpoints" / "exp-000002", "cpu")
        assert indexer.index.search(encoder(images), 1).experiences[:, 0].tolist() == [1] * 8 + [2] * 4
    finally:
        indexer.stop()


def test_a_hand_over_a_crash_kept_from_running_is_done_on_the_next_start(tmp_path):
    indexer = open_indexer(tmp_path)
    try:
        red = submit_colour(indexer, 1, "red", 6)
        blue = submit_colour(indexer, 1, "blue", 3)
        assert indexer.flush(30)
        # the cut was named with its tail, then the process died before the indexer's turn
        indexer.store.catalog.name_experience(1, "exp-1", {"boundary": "drift", "images_after_change": 3})
    finally:
        indexer.stop()
    indexer = open_indexer(tmp_path)
    try:
        assert indexer.flush(30)
        assert indexer.store.sample_ids(experience=1) == red and indexer.store.sample_ids(experience=2) == blue
        assert indexer.store.catalog.experience_names()[1]["handed_over"] is True
    finally:
        indexer.stop()


def test_opening_the_indexer_leaves_the_callers_torch_threads(tmp_path):
    """The daemon opens the indexer on its training thread: FAISS's thread count is set per call
    (replay/faiss_threads.py), never for the thread (that put the step on one core of two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        indexer = open_indexer(tmp_path, index_options=IndexOptions(threads=1))
        try:
            assert torch.get_num_threads() == 2
        finally:
            indexer.stop()
    finally:
        torch.set_num_threads(before)
