"""The daemon loop's batches: probes split off on the prefetch thread, the stream/replay split of
a step, a rank's stand-in batch, and what a rank hands rank 0 each iteration."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch

from deploy.probes import hashed_probe
from deploy.world import World
from streamer.records import Sample


@dataclass
class Prepared:
    """A batch made ready on the prefetch thread: probes split off, images stacked (and pinned)."""

    train: list[Sample]
    held_out: list[Sample]
    images: torch.Tensor | None  # (B,3,S,S) uint8 of `train`; page-locked for a fast async GPU copy

    @classmethod
    def of(cls, samples: list[Sample], probe_fraction: float, pin: bool) -> Prepared:
        train, held_out = split_probes(samples, probe_fraction)
        images = torch.stack([s.image for s in train]) if train else None
        if images is not None and pin:
            images = images.pin_memory()
        return cls(train, held_out, images)


def split_probes(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (to train on, probes: a `probe=1` header or the hash fraction)."""
    train, held_out = [], []
    for sample in samples:
        (held_out if sample.probe or hashed_probe(sample.sample_id, fraction) else train).append(sample)
    return train, held_out


def stream_batch_size(batch_size: int, replay_share: float) -> int:
    """Stream images per step; the rest of the batch comes from the replay buffer."""
    return max(1, round(batch_size * (1 - replay_share)))


def replay_count(stream_images: int, replay_share: float) -> int:
    """Replay images to add to `stream_images` so replay takes `replay_share` of the batch."""
    return round(stream_images * replay_share / (1 - replay_share))


def batch_records(samples: list[Sample]) -> int:
    """Distinct records behind a batch's samples."""
    return len({(s.partition, s.offset) for s in samples})


def standin(recent: deque[torch.Tensor], resolution: int) -> torch.Tensor:
    """What a rank with no data this iteration steps on to join the collective step (at
    loss weight 0): its last batch, or two blank images (2,3,S,S) uint8."""
    if recent:
        return recent[-1]
    return torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8)


@dataclass
class Shared:
    """What a rank hands rank 0 each iteration: its samples and how far it has read."""

    train: list[Sample]
    held_out: list[Sample]
    positions: dict[int, int]

    @classmethod
    def of(cls, train: list[Sample], held_out: list[Sample], positions: dict[int, int], world: World) -> Shared:
        """Across processes the trained images stay behind (the store keeps encoded bytes)."""
        if world.distributed:
            blank = torch.empty(0, dtype=torch.uint8)
            train = [replace(s, image=blank) for s in train]
        return cls(train, held_out, positions)
