"""Snapshot requests stay within bounded work: budget, epochs, retrieval size, samples read, labels CSV."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

import deploy.snapshots as snapshots
from deploy.http_api import error_status
from deploy.multipart import encode_form_data
from deploy.snapshot_errors import SnapshotError
from deploy.snapshot_request import create_from_request, parse_labels_csv
from deploy.snapshots import MAX_BUDGET, SnapshotEngine, parse_budget, parse_epochs
from learners.presets import PRESETS
from replay.index_table import SearchResult
from replay.retrieval import MAX_RESULTS, retrieve_budget
from tests.snapshot_testkit import build_state, target_images


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return build_state(tmp_path_factory.mktemp("state"), {1: "red", 2: "blue"})


@pytest.fixture
def engine(state):
    engine = SnapshotEngine.open_offline(state, "cpu")
    yield engine
    engine.close()


def test_a_budget_over_what_sept_can_use_answers_400_fast(engine):
    files = [("images", name, data) for name, data in target_images("blue", 2)]
    content_type, body = encode_form_data({"strategy": "sept", "budget": "1000000"}, files)
    started = time.perf_counter()
    with pytest.raises(SnapshotError) as err:
        create_from_request(engine, content_type, body)
    assert time.perf_counter() - started < 2.0
    assert error_status(err.value) == 400 and str(MAX_BUDGET) in err.value.message
    assert snapshots.SEPT_MAX_STEPS * max(p.batch_size for p in PRESETS.values()) == MAX_BUDGET
    assert parse_budget(str(MAX_BUDGET)) == MAX_BUDGET
    with pytest.raises(SnapshotError) as err:
        parse_budget(MAX_BUDGET + 1)
    assert error_status(err.value) == 400


def test_epochs_default_to_sept_epochs_and_are_refused_past_the_step_cap(engine):
    assert parse_epochs(None) == parse_epochs("") == snapshots.SEPT_EPOCHS
    assert parse_epochs("3") == 3 and parse_epochs(snapshots.SEPT_MAX_STEPS) == snapshots.SEPT_MAX_STEPS
    for bad in (0, snapshots.SEPT_MAX_STEPS + 1, "x", True, 2.5):
        with pytest.raises(SnapshotError) as err:
            parse_epochs(bad)
        assert error_status(err.value) == 400 and "epochs must be" in err.value.message
    files = [("images", name, data) for name, data in target_images("blue", 2)]
    content_type, body = encode_form_data({"strategy": "sept", "epochs": "0"}, files)
    started = time.perf_counter()
    with pytest.raises(SnapshotError) as err:
        create_from_request(engine, content_type, body)
    assert time.perf_counter() - started < 2.0 and error_status(err.value) == 400


def test_a_requests_epochs_set_septs_passes(engine):
    steps = {}
    for epochs in (1, 3):
        content_type, body = encode_form_data(
            {"strategy": "sept", "budget": "8", "epochs": str(epochs), "name": f"passes-{epochs}"},
            [("images", name, data) for name, data in target_images("blue", 4)])
        status, manifest = create_from_request(engine, content_type, body)
        assert status == 201 and manifest["sept_epochs"] == epochs
        steps[epochs] = manifest["sept_steps"]
    assert steps[3] == 3 * steps[1] > 0


def test_sept_reads_and_decodes_no_more_samples_than_it_trains_on(engine, monkeypatch):
    monkeypatch.setattr(snapshots, "SEPT_MAX_STEPS", 2)
    monkeypatch.setitem(PRESETS, "cpu", replace(PRESETS["cpu"], batch_size=4))  # SEPT uses 2 x 4
    decoded = []
    real_decode = snapshots.decode_images

    def counting_decode(encoded, size, limits):
        decoded.append(len(encoded))
        return real_decode(encoded, size, limits)

    monkeypatch.setattr(snapshots, "decode_images", counting_decode)
    manifest = engine.create(target_images("blue", 3), strategy="sept", budget=20, epochs=1, name="capped")
    assert manifest["budget"] == 20 and manifest["retrieved_count"] == 8
    assert decoded == [8] and manifest["sept_steps"] <= 2


class _OverlappingIndex:
    """Every query has the same neighbours s0, s1, ... (the worst case for retrieval)."""

    size = 1_000_000

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        self.asked.append((len(queries), k))
        row = [f"s{j}" for j in range(k)]
        return SearchResult(np.zeros((len(queries), k), np.float32), [row] * len(queries),
                            np.zeros((len(queries), k), np.int64))


def test_retrieval_never_asks_for_more_neighbours_than_it_can_use():
    index = _OverlappingIndex()
    picked = retrieve_budget(index, np.ones((1, 4), np.float32), 50, exclude_probe_ids={"s0", "s1", "s2"})
    assert len(picked) == 50 and max(k for _, k in index.asked) <= 53

    index = _OverlappingIndex()
    picked = retrieve_budget(index, np.ones((4000, 4), np.float32), MAX_BUDGET)
    assert max(m * k for m, k in index.asked) <= MAX_RESULTS
    assert len(picked) == max(k for _, k in index.asked)  # all the overlapping index holds within the cap


def test_a_labels_field_over_the_csv_limit_is_a_400():
    with pytest.raises(SnapshotError) as err:
        parse_labels_csv("a.png," + "x" * (200 * 1024) + "\n")
    assert error_status(err.value) == 400 and "labels CSV" in err.value.message
    with pytest.raises(SnapshotError) as err:
        parse_labels_csv('a.png,"unterminated\n' + "y" * (200 * 1024))
    assert error_status(err.value) == 400
