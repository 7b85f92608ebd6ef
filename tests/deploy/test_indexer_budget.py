"""Indexer within a compute budget: new samples and refreshes wait for their share of training,
the live index serves its version meanwhile, and the freshness metrics say how far behind it is."""

from __future__ import annotations

import time

import pytest

import deploy.indexer
from deploy.index_budget import ComputeBudget
from deploy.metrics import Metrics
from tests.snapshot_testkit import open_indexer, submit_colour, write_experience_checkpoint


def settle(indexer, condition, timeout: float = 20.0) -> None:
    """Wait until `condition()` holds, then a little longer (the thread must stay put)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "indexer never got there"
        time.sleep(0.02)
    time.sleep(0.3)


@pytest.fixture
def budgeted(tmp_path, monkeypatch):
    """An indexer with encoder 1 live, then training active and a budget of one chunk."""
    monkeypatch.setattr("deploy.indexer.EMBED_BATCH", 4)
    budget = ComputeBudget(0.10, burst_s=0.0)
    indexer = open_indexer(tmp_path, budget=budget)
    indexer.new_encoder(1, write_experience_checkpoint(tmp_path, 1, seed=1))
    assert indexer.flush(30) and indexer.encoder_version == 1
    budget.trained(1e-4)  # training runs: allowance 1e-5 s, one chunk starts below it
    yield indexer, budget
    indexer.stop()


def test_new_samples_wait_for_budget_newest_first(budgeted):
    indexer, budget = budgeted
    red = submit_colour(indexer, 1, "red", 12)
    settle(indexer, lambda: indexer.index_size() > 0)
    assert indexer.index_size() == 4  # one chunk, then out of budget
    assert indexer.index.missing(red) == red[:8]  # the newest four went first
    assert indexer.upkeep().unindexed == 8
    assert indexer.store.stats()["count"] == 12  # storing never waits
    budget.trained(1000.0)
    settle(indexer, lambda: indexer.index_size() == 12)
    upkeep = indexer.upkeep()
    assert upkeep.unindexed == 0 and upkeep.seconds["embed"] > 0 and 0 < upkeep.share < 0.10


def test_refresh_rolls_within_budget_while_the_old_version_serves(budgeted, tmp_path):
    indexer, budget = budgeted
    red = submit_colour(indexer, 1, "red", 12)
    budget.trained(1000.0)
    settle(indexer, lambda: indexer.index_size() == 12)
    budget.spent("embed", 200.0)  # over the allowance (0.1 x 1000 s): out of budget
    assert not budget.allows()

    indexer.new_encoder(2, write_experience_checkpoint(tmp_path, 2, seed=2))
    time.sleep(0.5)
    upkeep = indexer.upkeep()
    assert indexer.index.current_version == 1 and indexer.index_size() == 12  # still served
    assert upkeep.versions_behind == 1 and upkeep.stale_seconds > 0.4 and upkeep.refresh_progress == 0.0
    hits = indexer.index.search(indexer._encoder(torch_images(indexer, red[:2])), 1).sample_ids
    assert [row[0] for row in hits] == red[:2]

    budget.rest()  # no input: the refresh takes the cores
    settle(indexer, lambda: indexer.index.current_version == 2)
    upkeep = indexer.upkeep()
    assert upkeep.versions_behind == 0 and upkeep.stale_seconds == 0.0 and upkeep.refresh_progress == 1.0
    assert indexer.sizes_by_version()[2] == 12 and upkeep.seconds["refresh"] > 0


def test_metrics_export_the_upkeep(budgeted):
    indexer, budget = budgeted
    submit_colour(indexer, 1, "red", 12)
    settle(indexer, lambda: indexer.index_size() == 4)
    metrics = Metrics()
    metrics.watch_index(indexer.upkeep)
    text = metrics.render().decode()
    assert 'tailord_indexer_seconds_total{kind="embed"}' in text
    assert 'tailord_indexer_seconds_total{kind="refresh"}' in text
    assert "tailord_index_unindexed_samples 8.0" in text
    assert "tailord_index_versions_behind 0.0" in text
    assert "tailord_index_stale_seconds 0.0" in text
    assert "tailord_index_refresh_progress 1.0" in text
    share = float(next(line.split()[1] for line in text.splitlines()
                       if line.startswith("tailord_indexer_compute_share ")))
    assert share == pytest.approx(budget.used_share) and share > 0


def torch_images(indexer, sample_ids):
    from deploy.indexer import decode_images
    from streamer.limits import DecodeLimits

    images, _ = decode_images(indexer.store.read(sample_ids), indexer.decode_size, DecodeLimits())
    return images


def test_the_queue_keeps_the_newest_and_the_refresh_takes_the_rest(budgeted, monkeypatch):
    indexer, budget = budgeted
    monkeypatch.setattr("deploy.indexer.MAX_UNINDEXED", 5)
    red = submit_colour(indexer, 1, "red", 12)
    settle(indexer, lambda: indexer.index_size() > 0)
    assert indexer.upkeep().unindexed == 1  # 5 kept of 12, then one chunk of 4 embedded
    assert indexer.index.missing(red) == red[:8]  # the newest went first
    assert indexer.flush(30) and indexer.index.missing(red) == red[:7]  # the other 7 wait for a refresh


def test_a_refresh_ends_while_samples_arrive_faster_than_it_embeds(budgeted, tmp_path, monkeypatch):
    """A refresh re-embeds the rows stored when it started; rows stored meanwhile follow with the
    new encoder. Paging them too, it chased the stream and never swapped in while the stream
    outpaced it (a daemon of 1,000-image experiences had no index after 16 of them)."""
    from tests.snapshot_testkit import colour_png

    indexer, budget = budgeted
    red = submit_colour(indexer, 1, "red", 12)
    budget.trained(1000.0)
    settle(indexer, lambda: indexer.index_size() == 12)
    arrived: list[str] = []
    decode = deploy.indexer.decode_images

    def decode_while_the_stream_outpaces(payloads, size, limits):
        if indexer._rebuild is not None and len(arrived) < 400:  # 8 new rows per page of 4
            ids = [f"blue-{len(arrived) + i}" for i in range(8)]
            indexer.store.add(ids, [colour_png("blue", 5000 + len(arrived) + i) for i in range(8)], 2, ["blue"] * 8)
            arrived.extend(ids)
        return decode(payloads, size, limits)

    monkeypatch.setattr("deploy.indexer.decode_images", decode_while_the_stream_outpaces)
    indexer.new_encoder(2, write_experience_checkpoint(tmp_path, 2, seed=2))
    settle(indexer, lambda: indexer.index.current_version == 2)
    assert len(arrived) <= 8 * 4, "the refresh read rows stored after it started"
    monkeypatch.setattr("deploy.indexer.decode_images", decode)
    assert indexer.flush(30)
    assert indexer.index.missing(red + arrived) == [] and indexer.index.current_version == 2
