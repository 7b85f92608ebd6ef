"""SEPT-style retrieval: the stored samples nearest to a target set, for tailored pretraining.

Neighbour lists of all target images are merged rank by rank (every target's
1st neighbour, then every 2nd, …) and deduplicated until ``budget`` distinct
samples are chosen, so each target image gets a fair share of the budget.

The search holds the index lock, so its size is bounded: a query never asks for more
neighbours than ``budget`` plus the excluded ids (more could never be picked), and all
queries together never ask for more than ``MAX_RESULTS``.

An index that lags the newest encoder (its refresh runs within a compute share) can be
corrected at query time: ``rerank_budget`` picks the budget again from a larger pool the
stale index retrieved, scored by vectors of the newer encoder, with the same merge.

Nearest is not always near: when the store holds nothing like the targets, their nearest
samples come from another distribution. ``within_targets`` keeps only the samples inside the
targets' k-NN manifold (Kynkäänniemi et al., 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"): a sample is kept when it is at least as similar to some target
as that target is to its k-th nearest fellow target.
"""

from __future__ import annotations

import numpy as np

from replay.index import VectorIndex

MAX_RESULTS = 1 << 20
"""Most (query, neighbour) pairs one search returns (scores, ids and experiences: ~30 MB)."""
RELEVANCE_K = 5
"""Default k of ``within_targets``. On the held-out snapshot benchmark (docs/snapshots.md,
"Retrieval inside the targets' manifold") k = 5 kept 0.67-1.00 of what the four same-source
tasks retrieved and 0.06-0.58 of what the different-source task did (k = 3 kept 0.40-0.55
of the textures task's); at a budget of 200 it turned retrieval's cost on the
different-source task (-12 kNN points against the targets alone) into none."""


def retrieve_budget(
    index: VectorIndex,
    queries: np.ndarray,
    budget: int,
    exclude_probe_ids: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Up to ``budget`` distinct sample ids near ``queries`` (M, D), probes excluded, best first."""
    m = len(queries)
    if budget <= 0 or m == 0:
        return []
    most = min(index.size, budget + len(exclude_probe_ids), max(1, MAX_RESULTS // m))
    k = min(most, -(-budget // m) * 2)  # doubled below while overlaps/exclusions leave it short
    while True:
        picked = _round_robin(index.search(queries, k).sample_ids, budget, exclude_probe_ids)
        if len(picked) >= budget or k >= most:
            return picked
        k = min(most, 2 * k)


def rerank_budget(candidates: list[str], vectors: np.ndarray, queries: np.ndarray, budget: int) -> list[str]:
    """Up to ``budget`` of ``candidates`` (P ids, ``vectors`` (P, D)) nearest to ``queries`` (M, D),
    merged rank by rank as ``retrieve_budget`` does, best first.

    Usage: retrieve a pool of ``4 * budget`` from the stale index, embed the pool and the
    targets with the newer encoder, then ``rerank_budget(pool, pool_vectors, new_queries, budget)``.
    """
    m, p = len(queries), len(candidates)
    if budget <= 0 or m == 0 or p == 0:
        return []
    k = min(p, -(-budget // m) * 2)  # doubled below while overlaps leave it short
    while True:
        picked = _round_robin(_nearest(vectors, queries, k, candidates), budget, frozenset())
        if len(picked) >= budget or k >= p:
            return picked
        k = min(p, 2 * k)


def within_targets(vectors: np.ndarray, queries: np.ndarray, k: int = RELEVANCE_K) -> np.ndarray:
    """(R,) bool: which of ``vectors`` (R, D) lie inside the k-NN manifold of ``queries`` (M, D).

    Row ``r`` is kept when its cosine similarity to some query ``i`` is at least query ``i``'s
    similarity to its k-th nearest other query. With ``k`` = 0 or at most ``k`` queries there
    is no manifold to test against: all are kept. Scores are computed in row chunks of at most
    ``MAX_RESULTS``, so memory stays bounded for 10,000 targets.

    Usage::

        keep = within_targets(retrieved_vectors, target_vectors)  # (R,) bool
        sept_samples = [sid for sid, ok in zip(retrieved_ids, keep) if ok]
    """
    if k == 0 or len(queries) <= k:
        return np.ones(len(vectors), dtype=bool)
    q, v = _unit(queries), _unit(vectors)
    rows = max(1, MAX_RESULTS // len(q))
    radius = np.empty(len(q), dtype=np.float32)  # (M,) similarity to the k-th nearest other query
    for first in range(0, len(q), rows):
        scores = q[first:first + rows] @ q.T  # (rows, M)
        scores[np.arange(len(scores)), np.arange(first, first + len(scores))] = -np.inf  # not itself
        radius[first:first + rows] = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    keep = np.zeros(len(v), dtype=bool)
    for first in range(0, len(v), rows):
        keep[first:first + rows] = (v[first:first + rows] @ q.T >= radius).any(axis=1)  # (rows, M) -> (rows,)
    return keep


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _nearest(vectors: np.ndarray, queries: np.ndarray, k: int, ids: list[str]) -> list[list[str]]:
    """Each query's ``k`` best ids by inner product, in row chunks of at most ``MAX_RESULTS`` scores."""
    rows = max(1, MAX_RESULTS // len(vectors))
    neighbours: list[list[str]] = []
    for first in range(0, len(queries), rows):
        scores = queries[first:first + rows] @ vectors.T  # (rows, P)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (rows, k), unordered
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
        neighbours += [[ids[j] for j in row] for row in top]
    return neighbours


def _round_robin(
    neighbours: list[list[str]], budget: int, exclude: set[str] | frozenset[str]
) -> list[str]:
    picked: dict[str, None] = {}
    for rank in range(len(neighbours[0]) if neighbours else 0):
        for row in neighbours:
            sid = row[rank]
            if sid and sid not in exclude and sid not in picked:
                picked[sid] = None
                if len(picked) == budget:
                    return list(picked)
    return list(picked)
