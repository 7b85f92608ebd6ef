"""Reservoir replay buffer: a uniform sample of every image streamed so far.

Vitter's Algorithm R keeps each of the ``seen`` images with probability
capacity/seen, so replayed batches mix old and new experiences in proportion
to how much of each was streamed. The buffer is bounded both in images and in
bytes, and saves to safetensors + JSON (no pickle) so that a restored buffer,
RNG included, continues exactly as the original would have.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from safefiles.files import write_atomic

TENSORS_FILE = "buffer.safetensors"
META_FILE = "buffer.json"


@dataclass
class Reservoir:
    """One reservoir: the kept images, their ids and domains, and how many were offered."""

    images: list[torch.Tensor] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    seen: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def offer(
        self,
        sample_ids: list[str],
        images: torch.Tensor,
        domains: list[str],
        capacity: int,
        rng: np.random.Generator,
    ) -> None:
        """Algorithm R over a batch: item number t replaces slot j ~ U[0, t) when j < capacity."""
        n = len(sample_ids)
        fill = max(0, min(n, capacity - len(self.images)))
        for i in range(fill):
            self.images.append(images[i].clone())
            self.sample_ids.append(sample_ids[i])
            self.domains.append(domains[i])
        if n > fill:
            counts = np.arange(self.seen + fill + 1, self.seen + n + 1)
            slots = rng.integers(0, counts)
            for i in np.flatnonzero(slots < capacity):
                j, src = int(slots[i]), fill + int(i)
                self.images[j] = images[src].clone()
                self.sample_ids[j] = sample_ids[src]
                self.domains[j] = domains[src]
        self.seen += n

    def shrink(self, capacity: int, rng: np.random.Generator) -> None:
        """Down-sample uniformly to ``capacity`` (a uniform subsample stays uniform)."""
        if len(self.images) <= capacity:
            return
        keep = np.sort(rng.choice(len(self.images), capacity, replace=False))
        self.images = [self.images[i] for i in keep]
        self.sample_ids = [self.sample_ids[i] for i in keep]
        self.domains = [self.domains[i] for i in keep]


def check_batch(sample_ids: list[str], images: torch.Tensor, domains: list[str]) -> torch.Tensor:
    """Validate an ``add`` batch and return the images as a CPU uint8 tensor."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 (B,3,S,S), got {images.dtype} {tuple(images.shape)}"
        )
    if not len(sample_ids) == len(domains) == images.shape[0]:
        raise ValueError("sample_ids, images and domains must have the same length")
    return images.detach().cpu()


class ReplayBuffer:
    """Shared bookkeeping of the replay buffers: limits, RNG, persistence.

    Subclasses decide how images are spread over ``self._reservoirs`` (keyed
    by domain/cluster, or a single key) and how ``sample`` draws from them.
    """

    kind = "base"

    def __init__(self, max_images: int, max_bytes: int, seed: int = 0) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._rng = np.random.default_rng(seed)
        self._reservoirs: dict[str, Reservoir] = {}
        self._shape: tuple[int, ...] | None = None

    @property
    def capacity(self) -> int:
        """Images the buffer may hold: min(max_images, max_bytes // bytes per image)."""
        if self._shape is None:
            return self.max_images
        return min(self.max_images, self.max_bytes // int(np.prod(self._shape)))

    def __len__(self) -> int:
        return sum(len(r) for r in self._reservoirs.values())

    @property
    def nbytes(self) -> int:
        return sum(img.numel() for r in self._reservoirs.values() for img in r.images)

    @property
    def sample_ids(self) -> list[str]:
        """Ids of the kept images."""
        return [sid for r in self._reservoirs.values() for sid in r.sample_ids]

    @property
    def seen(self) -> int:
        return sum(r.seen for r in self._reservoirs.values())

    def _accept_shape(self, images: torch.Tensor) -> None:
        shape = tuple(images.shape[1:])
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(f"image shape {shape} differs from the buffer's {self._shape}")

    def _gather(self, picks: list[tuple[str, int]]) -> torch.Tensor | None:
        if not picks:
            return None
        return torch.stack([self._reservoirs[key].images[i] for key, i in picks])

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Images stacked in one tensor, everything else JSON-able (RNG state as ints)."""
        reservoirs = list(self._reservoirs.items())
        images = [img for _, r in reservoirs for img in r.images]
        tensors = {"images": torch.stack(images)} if images else {}
        meta = {
            "kind": self.kind,
            "shape": list(self._shape) if self._shape else None,
            "rng": self._rng.bit_generator.state,
            "reservoirs": [
                {"key": key, "seen": r.seen, "sample_ids": r.sample_ids, "domains": r.domains}
                for key, r in reservoirs
            ],
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore a state; this buffer's own limits apply (it shrinks if they are smaller)."""
        if meta["kind"] != self.kind:
            raise ValueError(f"state of a {meta['kind']} buffer, not {self.kind}")
        self._shape = tuple(meta["shape"]) if meta["shape"] else None
        self._rng.bit_generator.state = meta["rng"]
        images = tensors.get("images")
        self._reservoirs = {}
        start = 0
        for entry in meta["reservoirs"]:
            n = len(entry["sample_ids"])
            self._reservoirs[entry["key"]] = Reservoir(
                images=[images[i].clone() for i in range(start, start + n)] if n else [],
                sample_ids=list(entry["sample_ids"]),
                domains=list(entry["domains"]),
                seen=entry["seen"],
            )
            start += n
        self._rebalance()

    def _rebalance(self) -> None:
        """Enforce the capacity after a restore (subclasses split it over keys)."""
        for r in self._reservoirs.values():
            r.shrink(self.capacity, self._rng)

    def save(self, directory: Path) -> None:
        """Write ``buffer.safetensors`` then ``buffer.json`` (which holds its sha256), atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_dict()
        blob = save_tensors(tensors)
        meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        write_atomic(directory / TENSORS_FILE, blob)
        write_atomic(directory / META_FILE, json.dumps(meta).encode())

    def load(self, directory: Path) -> None:
        """Restore from ``save``'s files; a mismatched pair (torn save) raises ValueError."""
        directory = Path(directory)
        meta = json.loads((directory / META_FILE).read_bytes())
        blob = (directory / TENSORS_FILE).read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.pop("tensors_sha256"):
            raise ValueError(f"{directory / TENSORS_FILE} does not match {META_FILE}")
        self.load_state_dict(load_tensors(blob), meta)


class ReservoirBuffer(ReplayBuffer):
    """A single reservoir over the whole stream; ``sample`` is uniform without replacement."""

    kind = "reservoir"
    _KEY = "all"

    def add(self, sample_ids: list[str], images: torch.Tensor, domains: list[str]) -> None:
        images = check_batch(sample_ids, images, domains)
        self._accept_shape(images)
        reservoir = self._reservoirs.setdefault(self._KEY, Reservoir())
        reservoir.offer(list(sample_ids), images, list(domains), self.capacity, self._rng)

    def sample(self, n: int) -> torch.Tensor | None:
        """``n`` distinct kept images (all of them if fewer), or None when empty."""
        size = len(self)
        if size == 0 or n <= 0:
            return None
        picks = self._rng.choice(size, min(n, size), replace=False)
        return self._gather([(self._KEY, int(i)) for i in picks])
