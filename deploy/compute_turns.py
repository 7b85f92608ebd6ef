"""Turns on the CPU's cores: the training step (with the drift detector's sample embedding) and
the indexer's embedding chunks run one at a time (docs/design.md, "deploy — index upkeep").

On a CPU every thread that issues torch ops runs them on the same cores through its own
intra-op team. When the indexer embeds while the step trains, both slow down: on 2 cores a
MoCo-sized step lost 5-10 % of its speed while the indexer, at 10 % of the step's seconds,
embedded at ~960 images/s instead of ~1,700 alone (`benchmarks/compute_turns.py`,
docs/scaling.md, "Turns on the cores"). Taking turns, each runs at full speed: the step
keeps the bare step's speed and the indexer's budget buys more embeddings per second. The
evaluator stays beside the step: it is paced one probe set at a time, seconds each, and
holding the cores that long stalled the step (measured in the same place).
On a GPU the kernels queue on the device, so the turns are off (a no-op).

Usage:
    turns = ComputeTurns(enabled=device.type == "cpu")
    with turns:                     # the training loop, around the step
        learner.step(...)
    with budget.turns:              # the indexer, around one chunk (its budget holds the turns)
        embed(...)
"""

from __future__ import annotations

import threading
from types import TracebackType


class ComputeTurns:
    """A first-come, first-served lock around torch work on the CPU; a no-op when disabled (GPU).

    First come, first served because a plain lock is not fair: a thread that releases it and
    asks again at once (the indexer between chunks, unbounded while the loop rests) can take
    it back before a waiting thread wakes, so the step waited for a whole store refresh.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._cond = threading.Condition()
        self._issued = 0  # tickets handed out
        self._serving = 0  # the ticket whose turn it is

    def acquire(self) -> None:
        """Wait for the cores, after everyone who asked before."""
        if not self.enabled:
            return
        with self._cond:
            ticket, self._issued = self._issued, self._issued + 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        """Hand the cores to the next in line."""
        if not self.enabled:
            return
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> ComputeTurns:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
