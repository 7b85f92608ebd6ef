"""replay.retrieval.rerank_budget: a pool picked again by fresher vectors, merged rank by rank."""

from __future__ import annotations

import numpy as np
import pytest

import replay.retrieval as retrieval
from replay.retrieval import rerank_budget


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
