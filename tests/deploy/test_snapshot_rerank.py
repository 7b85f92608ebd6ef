"""A SEPT snapshot on an index that lags the newest checkpoint re-ranks a larger pool with the
newest encoder (deploy/snapshot_rerank.py, SnapshotEngine._rerank)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.indexer import Encoder, decode_images, experience_checkpoints
from deploy.snapshot_rerank import embed_stored
from deploy.snapshots import SnapshotEngine
from replay.retrieval import rerank_budget
from tests.snapshot_testkit import build_state, target_images, write_experience_checkpoint


@pytest.fixture(scope="module")
def lagging(tmp_path_factory):
    """Experiences 1 (red) and 2 (blue), indexed at version 2; checkpoint 3 written after (a
    refresh not done yet)."""
    state = build_state(tmp_path_factory.mktemp("state"), {1: "red", 2: "blue"}, n=24, probes=2)
    write_experience_checkpoint(state, 3, seed=3)
    return state


def test_the_pool_is_re_ranked_by_the_newest_encoder(lagging):
    engine = SnapshotEngine.open_offline(lagging, "cpu", rerank_pool=4)
    try:
        checkpoints = experience_checkpoints(engine.checkpoint_root)
        images = engine._decode_targets(target_images("blue", 6))
        stale = engine._live_encoder(checkpoints)
        pool = engine._retrieve(stale(images), 4 * 5)
        picked, rerank, (ranker, queries, picked_vectors) = engine._rerank(pool, images, 5, checkpoints, stale.version)
        assert rerank == {"index_encoder": 2, "reranked_by": 3, "pool": 20}

        newest = Encoder.load(3, checkpoints[3], "cpu")
        rows, encoded = engine._read(pool)
        vectors = newest(decode_images(encoded, engine.decode_size, engine.limits)[0])
        assert picked == rerank_budget([r.sample_id for r in rows], vectors, newest(images), 5)
        assert picked != pool[:5]  # the stale order would have picked others
        ids = [r.sample_id for r in rows]  # the vectors handed on to the manifold test are the picked ones'
        assert ranker.version == 3 and queries.shape == (6, vectors.shape[1])
        assert picked_vectors == pytest.approx(vectors[[ids.index(sid) for sid in picked]], abs=1e-5)
        assert engine._rerank(pool, images, 5, checkpoints, 3) == (pool[:5], None, None)  # index is fresh
    finally:
        engine.close()


def test_snapshot_manifest_records_the_re_rank(lagging):
    engine = SnapshotEngine.open_offline(lagging, "cpu", rerank_pool=4)
    try:
        manifest = engine.create(target_images("blue", 4), strategy="sept", budget=8, epochs=1, name="fresh")
        engine.rerank_pool = 1
        as_is = engine.create(target_images("blue", 4), strategy="sept", budget=8, epochs=1, name="as-is")
        route = engine.create(target_images("blue", 4), strategy="route", name="route")
    finally:
        engine.close()
    assert manifest["rerank"] == {"index_encoder": 2, "reranked_by": 3, "pool": 32}
    assert manifest["retrieved_count"] == 8 and manifest["index_freshness"]["versions_behind"] == 1
    assert as_is["rerank"] is None and as_is["retrieved_count"] == 8
    assert route["rerank"] is None


def test_the_daemon_and_offline_snapshots_default_to_the_same_pool():
    from deploy.settings import Settings
    from deploy.snapshot_rerank import RERANK_POOL

    assert Settings().snapshot_rerank_pool == RERANK_POOL


def test_embed_stored_skips_evicted_and_undecodable_samples(lagging):
    engine = SnapshotEngine.open_offline(lagging, "cpu")
    try:
        pool = engine._retrieve(engine._live_encoder(experience_checkpoints(engine.checkpoint_root))(
            engine._decode_targets(target_images("red", 2))), 6)
        real = engine._read

        def read(ids):
            rows, encoded = real([sid for sid in ids if sid != pool[0]])  # pool[0] evicted meanwhile
            return rows, [b"not an image"] + encoded[1:]  # and the next one corrupt

        newest = Encoder.load(3, experience_checkpoints(engine.checkpoint_root)[3], "cpu")
        ids, vectors = embed_stored(newest, read, pool, engine.decode_size, engine.limits)
    finally:
        engine.close()
    assert ids == pool[2:] and vectors.shape == (4, newest.backbone.feature_dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_each_chunk_is_embedded_in_its_turn(lagging, monkeypatch):
    import deploy.snapshot_rerank as rerank

    class Turns:
        held = 0

        def __enter__(self):
            self.held += 1

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(rerank, "CHUNK", 4)
    engine = SnapshotEngine.open_offline(lagging, "cpu")
    try:
        pool = engine.store.sample_ids(probe=False)[:10]
        newest = Encoder.load(3, experience_checkpoints(engine.checkpoint_root)[3], "cpu")
        turns = Turns()
        ids, vectors = embed_stored(newest, engine._read, pool, engine.decode_size, engine.limits, turns)
    finally:
        engine.close()
    assert ids == pool and len(vectors) == 10 and turns.held == 3  # chunks of 4, 4 and 2


def test_the_pool_is_capped_and_never_below_the_budget(lagging, monkeypatch):
    import deploy.snapshots as snapshots

    monkeypatch.setattr(snapshots, "RERANK_MAX_POOL", 20)
    engine = SnapshotEngine.open_offline(lagging, "cpu", rerank_pool=4)
    try:
        checkpoints = experience_checkpoints(engine.checkpoint_root)
        assert engine._pool_size(4, 2, checkpoints, "sept") == 16  # 4 budgets
        assert engine._pool_size(8, 2, checkpoints, "route+sept") == 20  # capped
        assert engine._pool_size(30, 2, checkpoints, "sept") == 30  # the budget itself
        assert engine._pool_size(8, 3, checkpoints, "sept") == 8  # a fresh index: no pool
        assert engine._pool_size(8, 2, checkpoints, "route") == 0
        manifest = engine.create(target_images("blue", 4), strategy="sept", budget=8, epochs=1, name="capped")
    finally:
        engine.close()
    assert manifest["rerank"]["pool"] == 20 and manifest["retrieved_count"] == 8


def test_offline_snapshots_take_the_pool_from_the_daemons_settings(lagging, tmp_path, monkeypatch):
    from deploy.snapshot_client import request_snapshot

    targets = tmp_path / "targets"
    targets.mkdir()
    for filename, data in target_images("red", 4):
        (targets / filename).write_bytes(data)
    monkeypatch.setenv("TAILORD_SNAPSHOT_RERANK_POOL", "3")
    result = request_snapshot(targets, None, tmp_path / "out", "sept", 8, lagging, None, None, None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rerank"] == result["rerank"] == {"index_encoder": 2, "reranked_by": 3, "pool": 24}
