"""Plain types that flow out of the streamer: raw records, decoded images, samples, batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class RejectedRecord(Exception):
    """A record that cannot be trained on; it goes to the DLQ with `reason` as its header.

    `reason` is a short stable label (a Prometheus label value), `detail` is for humans.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RawRecord:
    """One Kafka record as consumed, before decoding."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    key: bytes | None = None


@dataclass(frozen=True)
class DecodedImage:
    """One image decoded from a record (a record holding a tar batch yields several)."""

    image: torch.Tensor | None  # (3, size, size) uint8 RGB; None: a deferred JPEG (see decode_record)
    encoded: bytes  # the original encoded bytes, kept by the sample store
    fmt: str  # "jpeg" | "png" | "webp" | "bmp" | "tiff" | "ppm" | "gif"
    key: str | None  # tar member key; None for a single-image record
    headers: dict[str, str]  # record headers merged with the member's KEY.json


@dataclass(frozen=True)
class Sample:
    """A decoded image with its identity and stream position, ready to batch."""

    sample_id: str
    image: torch.Tensor  # (3, size, size) uint8
    encoded: bytes
    domain: str
    label: str | None
    probe: bool
    partition: int
    offset: int


@dataclass
class Batch:
    """Samples in stream order and where to resume once they are trained.

    positions[p] is the offset of the first record of partition p that is not wholly
    inside this batch or an earlier one: seeking there after a restart skips nothing.
    """

    samples: list[Sample]
    positions: dict[int, int]
    prepared: Any = None  # what the Prefetcher's `prepare` made of the samples, off the training thread


Decoded = list[DecodedImage] | RejectedRecord
"""What decoding one record gives: its images, or the reason it goes to the DLQ."""

ParallelMap = Callable[[Callable[[RawRecord], Decoded], list[RawRecord]], list[Decoded]]
"""Maps a per-record decode over records on the prefetcher's worker threads, keeping order."""
