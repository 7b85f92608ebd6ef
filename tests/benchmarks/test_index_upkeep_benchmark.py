"""benchmarks/index_upkeep.py end to end on a tiny store: one JSON line with the arms, the paired
on/off blocks, the indexer's cost and, per experience, retrieval and routing against a full re-embed (#17)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_run_prints_the_measures():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.index_upkeep", "--store", "400", "--experiences", "2",
         "--experience-images", "128", "--targets", "4", "--warm-images", "128", "--paired-rounds", "2",
         "--paired-steps", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["images_per_second_on"] > 0 and result["images_per_second_off"] > 0
    assert set(result["indexer_seconds"]) == {"embed", "refresh"} and result["indexer_seconds"]["refresh"] > 0
    assert [e["experience"] for e in result["experiences"]] == [5, 6]
    assert len(result["step_seconds_off"]) == 2 and all(s > 0 for s in result["step_seconds_off"])
    paired = result["paired"]  # on and off blocks alternating in one process
    assert paired["images_per_second_on"] > 0 and paired["images_per_second_off"] > 0
    assert len(paired["round_ratios"]) == 2 and all(r > 0 for r in paired["round_ratios"])
    assert paired["step_seconds"]["on"] > 0 and paired["step_seconds"]["off"] > 0
    assert set(result["rerank_seconds"]) == {"64x4", "64x16"} and all(v > 0 for v in result["rerank_seconds"].values())
    for i, experience in enumerate(result["experiences"]):
        assert experience["stored"] == 400 + 128 * (i + 1)  # the stream is stored, whatever is indexed
        assert 0 <= experience["recall_at_50"] <= 1 and 0 <= experience["recall_at_50_reranked_x4"] <= 1
        assert experience["recall_at_50_reranked_x16"] >= experience["recall_at_50_reranked_x4"]  # a superset pool
        sept = experience["sept_retrieval"]["budget_64"]  # the smallest budget (the default on this store)
        assert set(sept) == {"pool_x1", "pool_x4", "pool_x16", "unindexed"} and all(0 <= v <= 1 for v in sept.values())
        assert sept["pool_x16"] <= 1 - sept["unindexed"]  # what the index lacks, no pool finds
        assert 0 <= experience["routing_agreement"] <= 1 and experience["versions_behind"] >= 1
        training = experience["training"]
        assert 0 < training["step_seconds"] <= training["wall_seconds"]
        assert training["indexer_charged_seconds"] >= 0 and training["indexer_cpu_seconds"] >= 0  # /proc: Linux
