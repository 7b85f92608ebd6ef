"""Balanced replay buffer: an equal share of the capacity per key (domain or cluster).

A plain reservoir replays domains in proportion to how much of each was
streamed, so a long domain crowds out a short one. Here each key (the domain
by default, or a cluster id chosen by the caller) has its own reservoir; when
a new key appears the capacity is re-split evenly and the existing keys are
down-sampled uniformly, and ``sample`` draws evenly across keys.
"""

from __future__ import annotations

import torch

from replay.buffer import ReplayBuffer, Reservoir, check_batch


class BalancedBuffer(ReplayBuffer):
    """Per-key reservoirs with equal shares, bounded in images and bytes overall."""

    kind = "balanced"

    def shares(self) -> dict[str, int]:
        """Capacity of each key: an even split, the remainder going to the earliest keys."""
        keys = list(self._reservoirs)
        if not keys:
            return {}
        base, extra = divmod(self.capacity, len(keys))
        return {key: base + (i < extra) for i, key in enumerate(keys)}

    def add(
        self,
        sample_ids: list[str],
        images: torch.Tensor,
        domains: list[str],
        keys: list[str] | None = None,
    ) -> None:
        """Add a batch; ``keys`` (default: ``domains``) decides which reservoir each image joins."""
        images = check_batch(sample_ids, images, domains)
        keys = [str(k) for k in (domains if keys is None else keys)]
        if len(keys) != len(sample_ids):
            raise ValueError("keys must have one entry per image")
        self._accept_shape(images)
        new_keys = [k for k in dict.fromkeys(keys) if k not in self._reservoirs]
        for key in new_keys:
            self._reservoirs[key] = Reservoir()
        if new_keys:
            self._rebalance()
        shares = self.shares()
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            self._reservoirs[key].offer(
                [sample_ids[i] for i in idx],
                images[idx],
                [domains[i] for i in idx],
                shares[key],
                self._rng,
            )

    def _rebalance(self) -> None:
        for key, share in self.shares().items():
            self._reservoirs[key].shrink(share, self._rng)

    def sample(self, n: int) -> torch.Tensor | None:
        """``n`` distinct images spread evenly over keys (a short key gives what it has)."""
        counts = {k: len(r) for k, r in self._reservoirs.items() if len(r)}
        remaining = min(n, sum(counts.values()))
        if remaining <= 0:
            return None
        alloc = dict.fromkeys(counts, 0)
        while remaining:
            room = [k for k in counts if alloc[k] < counts[k]]
            per, extra = divmod(remaining, len(room))
            lucky = set(self._rng.choice(len(room), extra, replace=False).tolist())
            for i, key in enumerate(room):
                give = min(per + (i in lucky), counts[key] - alloc[key])
                alloc[key] += give
                remaining -= give
        picks = [
            (key, int(i))
            for key, m in alloc.items()
            for i in self._rng.choice(counts[key], m, replace=False)
        ]
        order = self._rng.permutation(len(picks))
        return self._gather([picks[i] for i in order])
