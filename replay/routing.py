"""Experience routing, SDR-style: which end-of-experience checkpoint suits a target task.

Each target image votes for the experiences of its k nearest stored samples,
weighted by a softmax over their cosine similarities (temperature ``T``), so
every target image casts exactly one vote in total. The experience whose data
lies closest to the target set collects the largest share.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from replay.index import VectorIndex

ROUTE_K = 50  # neighbours per target image that vote


def experience_votes(
    scores: np.ndarray, experiences: np.ndarray, temperature: float = 0.07
) -> dict[int, float]:
    """Sum over queries of softmax(score / T) mass per experience; empty slots are ignored.

    ``scores``/``experiences`` are (M, k) as returned by ``VectorIndex.search``
    (experience -1 or a non-finite score marks an empty slot).
    """
    scores = np.asarray(scores, dtype=np.float64)
    experiences = np.asarray(experiences, dtype=np.int64)
    valid = (experiences >= 0) & np.isfinite(scores)
    logits = np.where(valid, scores / temperature, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    weights = np.where(valid, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    votes: dict[int, float] = defaultdict(float)
    for exp, weight in zip(experiences[valid].tolist(), weights[valid].tolist(), strict=True):
        votes[exp] += weight
    return dict(votes)


def rank_experiences(votes: dict[int, float]) -> list[tuple[int, float]]:
    """(experience, share of all votes), largest share first; ties go to the earlier experience."""
    total = sum(votes.values())
    if total <= 0:
        return []
    return sorted(((exp, v / total) for exp, v in votes.items()), key=lambda ev: (-ev[1], ev[0]))


def route(
    scores: np.ndarray, experiences: np.ndarray, temperature: float = 0.07
) -> list[tuple[int, float]]:
    """Ranked candidate experiences for a target set's neighbour lists."""
    return rank_experiences(experience_votes(scores, experiences, temperature))


def route_targets(index: VectorIndex, queries: np.ndarray, k: int = ROUTE_K) -> list[tuple[int, float]]:
    """Ranked experiences for target embeddings `queries` (M, d): each votes with its `k` nearest
    stored samples in `index` (fewer when fewer are indexed)."""
    result = index.search(queries, min(k, index.size))
    return route(result.scores, result.experiences)
