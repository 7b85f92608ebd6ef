"""FAISS's OpenMP thread count for a block of calls, restored after it: ``faiss_threads``.

FAISS and torch share one OpenMP runtime, and its thread count belongs to the calling thread.
So ``faiss.omp_set_num_threads(1)`` on a thread that also runs torch puts every later torch op
of that thread on one thread too: the daemon's indexer did so once on the main thread, and the
training step ran on one core of two for the whole run (docs/scaling.md, "FAISS's thread count
was the step's"). Set the count around the FAISS calls instead.

Usage:
    with faiss_threads(1):
        index.search(queries, k)  # one OpenMP thread; the thread's torch ops keep theirs after
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss


@contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """Run the block's FAISS calls on ``threads`` OpenMP threads (0: the calling thread's count)."""
    if threads <= 0:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
