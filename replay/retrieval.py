"""SEPT-style retrieval: the stored samples nearest to a target set, for tailored pretraining.

Neighbour lists of all target images are merged rank by rank (every target's
1st neighbour, then every 2nd, …) and deduplicated until ``budget`` distinct
samples are chosen, so each target image gets a fair share of the budget.

The search holds the index lock, so its size is bounded: a query never asks for more
neighbours than ``budget`` plus the excluded ids (more could never be picked), and all
queries together never ask for more than ``MAX_RESULTS``.
"""

from __future__ import annotations

import numpy as np

from replay.index import VectorIndex

MAX_RESULTS = 1 << 20
"""Most (query, neighbour) pairs one search returns (scores, ids and experiences: ~30 MB)."""


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
