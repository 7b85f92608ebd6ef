"""replay.retrieval: rerank_budget (a pool picked again by fresher vectors, merged rank by rank) and
within_targets (the retrieved samples inside the targets' k-NN manifold)."""

from __future__ import annotations

import numpy as np
import pytest

import replay.retrieval as retrieval
from replay.retrieval import rerank_budget, within_targets


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def pool():
    """200 ids with random unit vectors (8-d) and 5 queries."""
    rng = np.random.default_rng(0)
    return [f"s{i}" for i in range(200)], _unit(rng.normal(size=(200, 8))), _unit(rng.normal(size=(5, 8)))


def test_picks_each_querys_nearest_by_the_given_vectors(pool):
    ids, vectors, queries = pool
    picked = rerank_budget(ids, vectors, queries[:1], 10)
    assert picked == [ids[j] for j in np.argsort(-(vectors @ queries[0]))[:10]]  # best first


def test_merges_rank_by_rank_distinct_and_within_budget(pool):
    ids, vectors, queries = pool
    picked = rerank_budget(ids, vectors, queries, 12)
    assert len(picked) == len(set(picked)) == 12
    firsts = {ids[int(np.argmax(vectors @ q))] for q in queries}
    assert firsts <= set(picked[:5])  # every query's best neighbour comes before any second
    repeated = np.repeat(queries[:1], 4, axis=0)  # identical queries overlap: k grows until filled
    assert rerank_budget(ids, vectors, repeated, 30) == rerank_budget(ids, vectors, queries[:1], 30)
    assert sorted(rerank_budget(ids, vectors, queries, 1000)) == sorted(ids)
    assert rerank_budget(ids, vectors, queries, 0) == [] and rerank_budget([], vectors[:0], queries, 5) == []


def test_scores_in_bounded_chunks_with_the_same_answer(pool, monkeypatch):
    ids, vectors, queries = pool
    whole = rerank_budget(ids, vectors, queries, 40)
    monkeypatch.setattr(retrieval, "MAX_RESULTS", 450)  # 2 queries x 200 ids per chunk
    assert rerank_budget(ids, vectors, queries, 40) == whole


def _brute_within(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """within_targets by its definition, one pair at a time."""
    radius = [sorted((float(q @ o) for j, o in enumerate(queries) if j != i), reverse=True)[k - 1]
              for i, q in enumerate(queries)]
    return np.array([any(float(v @ q) >= r for q, r in zip(queries, radius, strict=True)) for v in vectors])


@pytest.fixture
def two_clusters():
    """40 targets around one direction; 30 stored samples around it and 30 around another."""
    rng = np.random.default_rng(1)
    near, far = np.eye(16)[0], np.eye(16)[1]
    targets = _unit(near + 0.15 * rng.normal(size=(40, 16)))
    stored = _unit(np.concatenate([near + 0.15 * rng.normal(size=(30, 16)), far + 0.15 * rng.normal(size=(30, 16))]))
    return stored, targets


def test_keeps_the_samples_like_the_targets_and_drops_the_others(two_clusters):
    stored, targets = two_clusters
    keep = within_targets(stored, targets, k=5)
    assert keep[:30].mean() >= 0.8 and not keep[30:].any()
    assert (keep == _brute_within(stored, targets, 5)).all()
    assert (within_targets(stored, targets, k=1) == _brute_within(stored, targets, 1)).all()  # not itself
    assert within_targets(targets[:3], targets, k=5).all()  # a target's own copy is inside


def test_keeps_all_without_a_manifold_to_test(two_clusters):
    stored, targets = two_clusters
    assert within_targets(stored, targets, k=0).all()
    assert within_targets(stored, targets[:5], k=5).all()  # 5 targets: none has 5 others
    assert within_targets(stored[:0], targets, k=5).shape == (0,)


def test_manifold_in_bounded_chunks_with_the_same_answer(two_clusters, monkeypatch):
    stored, targets = two_clusters
    whole = within_targets(stored * 3.0, targets, k=5)  # lengths do not matter: cosine similarity
    monkeypatch.setattr(retrieval, "MAX_RESULTS", 7 * 40)  # 7 rows of 40 targets per chunk
    assert (within_targets(stored, targets, k=5) == whole).all()
