"""faiss_threads: FAISS's OpenMP count set for a block and restored, the caller's torch threads untouched."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from replay.faiss_threads import faiss_threads
from replay.index import VectorIndex
from replay.index_options import IndexOptions

DIM = 16


@pytest.fixture
def two_torch_threads():
    """The caller trains on 2 threads (tests/conftest.py runs the suite on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def counts_set(monkeypatch) -> list[int]:
    """Every count passed to faiss.omp_set_num_threads, in order."""
    calls, real = [], faiss.omp_set_num_threads

    def record(n: int) -> None:
        calls.append(n)
        real(n)

    monkeypatch.setattr(faiss, "omp_set_num_threads", record)
    return calls


def test_block_runs_on_the_count_and_restores_the_thread(two_torch_threads):
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == 2
    assert torch.get_num_threads() == 2  # the thread's torch ops keep their threads


def test_zero_leaves_the_count_alone(two_torch_threads, counts_set):
    with faiss_threads(0):
        assert faiss.omp_get_max_threads() == 2
    assert counts_set == []


def test_restored_when_the_block_raises(two_torch_threads):
    with pytest.raises(RuntimeError), faiss_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("exact_max", [10_000, 64])  # flat, and IVF trained past 64 vectors
def test_index_calls_run_on_the_options_threads_and_leave_the_callers(tmp_path, two_torch_threads, counts_set,
                                                                      exact_max):
    index = VectorIndex(tmp_path, DIM, IndexOptions(exact_max=exact_max, threads=1))
    x = np.random.default_rng(0).normal(size=(200, DIM)).astype(np.float32)
    index.add(1, x, [f"s{i}" for i in range(200)], [1] * 200)
    index.search(x[:5], 3)
    index.remove(["s0", "s1"])
    assert counts_set and counts_set[0::2] == [1] * (len(counts_set) // 2)  # each call: 1, then the caller's 2
    assert counts_set[1::2] == [2] * (len(counts_set) // 2)
    assert torch.get_num_threads() == 2


def test_options_refuse_a_negative_count():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        IndexOptions(threads=-1)
