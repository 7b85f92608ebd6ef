"""Probe sets: per-experience images kept out of training and used to measure forgetting.

A sample is a probe if its record says `probe=1` or if the hash of its sample id falls
under `TAILORD_PROBE_FRACTION` (deterministic: the same id is a probe after a restart).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from safefiles.files import write_atomic


def hashed_probe(sample_id: str, fraction: float) -> bool:
    """True for a stable `fraction` of sample ids."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(b"probe:" + sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class ProbeSet:
    """The probe images of one experience, bounded by `max_images` (first come, kept)."""

    experience: int
    max_images: int
    sample_ids: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # each (3,S,S) uint8
    positions: list[int] = field(default_factory=list)  # the experience's trained images when each was added

    def add(self, sample_id: str, image: torch.Tensor, label: str | None, domain: str, position: int = 0) -> None:
        if len(self.sample_ids) >= self.max_images or sample_id in self._ids():
            return
        self.sample_ids.append(sample_id)
        self.images.append(image)
        self.labels.append(label)
        self.domains.append(domain)
        self.positions.append(position)

    def split(self, since: int, experience: int) -> ProbeSet:
        """Remove the probes added once `since` images of the experience were trained, and return
        them as the first probes of `experience` (a drift boundary's tail, after its change point)."""
        tail = ProbeSet(experience, self.max_images)
        keep = [i for i, position in enumerate(self.positions) if position < since]
        for i, position in enumerate(self.positions):
            if position >= since:
                tail.add(self.sample_ids[i], self.images[i], self.labels[i], self.domains[i])
        for name in ("sample_ids", "images", "labels", "domains", "positions"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        return tail

    def _ids(self) -> set[str]:
        return set(self.sample_ids)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def stacked(self) -> torch.Tensor:
        """All images as one (N,3,S,S) uint8 tensor."""
        return torch.stack(self.images) if self.images else torch.empty(0, dtype=torch.uint8)

    @property
    def labelled(self) -> bool:
        """True when every image has a label and there are at least two classes."""
        return bool(self.labels) and all(lbl is not None for lbl in self.labels) and len(set(self.labels)) > 1

    def encode(self) -> tuple[bytes, bytes]:
        """The `.safetensors` bytes (the images) and the `.json` sidecar bytes (everything else)."""
        meta = {"experience": self.experience, "max_images": self.max_images, "sample_ids": self.sample_ids,
                "labels": self.labels, "domains": self.domains, "positions": self.positions}
        return save({"images": self.stacked().contiguous()}), json.dumps(meta).encode()

    def save(self, path: Path) -> None:
        """Write `path` (.safetensors) and its `.json` sidecar."""
        tensors, meta = self.encode()
        path.write_bytes(tensors)
        path.with_suffix(".json").write_bytes(meta)

    @classmethod
    def load(cls, path: Path) -> ProbeSet:
        meta = json.loads(path.with_suffix(".json").read_text())
        images = load_file(str(path))["images"]
        return cls(meta["experience"], meta["max_images"], meta["sample_ids"], meta["labels"], meta["domains"],
                   list(images.unbind(0)) if images.numel() else [],
                   meta.get("positions", [0] * len(meta["sample_ids"])))  # older sets: all at the start


def write_probe_set(probes: ProbeSet, folder: Path) -> None:
    """Persist a finished experience's probe set under `folder`, each file atomically (sidecar first)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"exp-{probes.experience:06d}"
    tensors, meta = probes.encode()
    write_atomic(folder / f"{name}.json", meta)
    write_atomic(folder / f"{name}.safetensors", tensors)


def read_probe_sets(folder: Path) -> dict[int, ProbeSet]:
    """All finished experiences' probe sets, by experience."""
    sets = {}
    for path in sorted(folder.glob("exp-*.safetensors")):
        probes = ProbeSet.load(path)
        sets[probes.experience] = probes
    return sets
