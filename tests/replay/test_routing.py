"""Routing votes (SDR-style) and budgeted retrieval (SEPT-style) on synthetic clusters."""

from __future__ import annotations

import numpy as np
import pytest

from replay.index import VectorIndex
from replay.retrieval import retrieve_budget
from replay.routing import experience_votes, rank_experiences, route, route_targets

DIM = 32


def _clusters(tmp_path, per: int = 200, n_exp: int = 4) -> tuple[VectorIndex, np.ndarray]:
    """Experience e's samples lie around their own random centre."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_exp, DIM)).astype(np.float32)
    index = VectorIndex(tmp_path, DIM)
    for exp in range(n_exp):
        x = centres[exp] + 0.3 * rng.normal(size=(per, DIM)).astype(np.float32)
        index.add(1, x, [f"e{exp}-{i}" for i in range(per)], [exp] * per)
    return index, centres


def test_targets_near_one_experience_route_to_it(tmp_path):
    index, centres = _clusters(tmp_path)
    rng = np.random.default_rng(1)
    targets = centres[2] + 0.3 * rng.normal(size=(25, DIM)).astype(np.float32)
    result = index.search(targets, 20)
    votes = experience_votes(result.scores, result.experiences)
    assert sum(votes.values()) == pytest.approx(25.0)  # each target contributes one vote
    ranked = route(result.scores, result.experiences)
    assert ranked[0][0] == 2 and ranked[0][1] > 0.9
    assert sum(share for _, share in ranked) == pytest.approx(1.0)


def test_mixed_targets_split_votes_and_closer_neighbours_weigh_more():
    scores = np.array([[0.9, 0.5, -np.inf], [0.8, 0.7, 0.6]], dtype=np.float32)
    exps = np.array([[1, 3, -1], [3, 3, 1]])
    votes = experience_votes(scores, exps, temperature=0.1)
    assert sum(votes.values()) == pytest.approx(2.0) and -1 not in votes
    first = 1 / (1 + np.exp(-4.0))  # query 0: softmax over (0.9, 0.5) / 0.1
    assert votes[1] == pytest.approx(first + np.exp(6) / (np.exp(8) + np.exp(7) + np.exp(6)))
    assert rank_experiences({1: 1.0, 2: 3.0, 0: 1.0}) == [(2, 0.6), (0, 0.2), (1, 0.2)]
    assert (
        rank_experiences({}) == []
        and experience_votes(np.full((1, 2), -np.inf), -np.ones((1, 2))) == {}
    )


def test_retrieval_is_distinct_fair_and_respects_budget_and_exclusions(tmp_path):
    index, centres = _clusters(tmp_path)
    rng = np.random.default_rng(2)
    near0 = centres[0] + 0.3 * rng.normal(size=(3, DIM)).astype(np.float32)
    near3 = centres[3] + 0.3 * rng.normal(size=(3, DIM)).astype(np.float32)
    queries = np.concatenate([near0, near3, near0])  # repeated targets overlap heavily
    probes = {f"e0-{i}" for i in range(0, 200, 2)}

    picked = retrieve_budget(index, queries, 60)
    assert len(picked) == len(set(picked)) == 60
    from_exp = [sid.split("-")[0] for sid in picked]
    assert set(from_exp) == {"e0", "e3"} and abs(from_exp.count("e0") - 30) <= 2  # rank by rank
    without = retrieve_budget(index, queries, 60, exclude_probe_ids=probes)
    assert len(without) == 60 and not set(without) & probes
    first = retrieve_budget(index, queries[:1], 1)
    assert first == [index.search(queries[:1], 1).sample_ids[0][0]]

    everything = retrieve_budget(index, queries, 10_000, exclude_probe_ids=probes)
    assert len(everything) == len(set(everything)) == 800 - 100
    assert retrieve_budget(index, queries, 0) == []


def test_route_targets_votes_with_the_nearest_indexed_samples(tmp_path):
    index, centres = _clusters(tmp_path, per=10)
    targets = centres[1] + 0.05 * np.random.default_rng(2).normal(size=(5, DIM)).astype(np.float32)
    ranked = route_targets(index, targets, k=1000)  # k past the index size: all 40 samples vote
    result = index.search(targets, 40)
    assert ranked == route(result.scores, result.experiences) and ranked[0][0] == 1
