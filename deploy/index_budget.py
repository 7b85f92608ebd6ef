"""The indexer's compute budget (a share of the training step's time, whatever the store size)
and `Upkeep`, what the indexer reports of its freshness and cost.

The training loop reports each step's seconds (`trained`) and says when it has nothing to
train (`rest`: no input on any rank). The indexer asks `allows()` before each chunk of
embedding and reports the seconds it spent (`spent`). While training runs, the indexer is
charged for its seconds and may only start a chunk while charged < share x trained + burst;
while the loop rests (and before its first step), the cores are free: the indexer runs
unbounded, and that work is counted but not charged.

Usage:
    budget = ComputeBudget(share=0.10)
    budget.trained(step_seconds)            # training loop, after every step
    budget.rest()                           # training loop, on a poll with no data
    if budget.allows():                     # indexer thread, before a chunk
        ...; budget.spent("refresh", seconds)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from deploy.compute_turns import ComputeTurns

KINDS = ("embed", "refresh")  # new samples into the live index; re-embedding the store for a new encoder
POLL_S = 0.05  # how often a thread out of budget looks again (the indexer's, the evaluator's)


class ComputeBudget:
    """Seconds the indexer may embed for, as a share of training seconds.

    Args:
        share: the indexer's seconds over training seconds while training runs; None: unbounded.
        burst_s: seconds it may run ahead of its share (0: it overshoots by at most the one chunk it
            starts while just under it).
        kinds: what the seconds are counted by (the experience-end evaluator has its own budget,
            of kind "evaluate").
        turns: the cores' turns the training step also takes (deploy/compute_turns.py); the
            budgeted work runs inside one; default: none (no waiting).
    """

    def __init__(self, share: float | None = 0.10, *, burst_s: float = 0.0,
                 kinds: tuple[str, ...] = KINDS, turns: ComputeTurns | None = None) -> None:
        if share is not None and not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.share = share
        self.burst_s = burst_s
        self.turns = turns or ComputeTurns(enabled=False)
        self._lock = threading.Lock()
        self._training = 0.0
        self._charged = 0.0
        self._resting = True  # until the first step
        self.seconds = dict.fromkeys(kinds, 0.0)  # every second spent by kind, charged or not

    def trained(self, seconds: float) -> None:
        """The training loop ran a step of `seconds`."""
        with self._lock:
            self._training += seconds
            self._resting = False

    def rest(self) -> None:
        """The training loop has no data: the budget does not bind until its next step."""
        with self._lock:
            self._resting = True

    @property
    def resting(self) -> bool:
        with self._lock:
            return self._resting

    def allows(self) -> bool:
        """Whether the indexer may start its next chunk now."""
        with self._lock:
            if self.share is None or self._resting:
                return True
            return self._charged < self.share * self._training + self.burst_s

    def spent(self, kind: str, seconds: float) -> None:
        """The indexer embedded for `seconds` (`kind`: one of `kinds`); charged unless the loop rests."""
        with self._lock:
            self.seconds[kind] += seconds
            if not self._resting:
                self._charged += seconds

    @property
    def used_share(self) -> float:
        """Charged indexer seconds over training seconds (0 before any step)."""
        with self._lock:
            return self._charged / self._training if self._training else 0.0


@dataclass(frozen=True)
class Upkeep:
    """How fresh the live index is and what keeping it so has cost (the daemon's metrics and
    /admin/status). The defaults: no index yet."""

    versions_behind: int = 0  # newest experience checkpoint minus the live index's encoder version
    stale_seconds: float = 0.0  # since a checkpoint newer than the live index exists (0: current)
    unindexed: int = 0  # stored non-probe samples waiting to be embedded into the live index
    refresh_progress: float = 1.0  # share of the store re-embedded by the refresh under way (1: none)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))  # by kind
    share: float = 0.0  # charged embedding seconds over training seconds
