"""SEPT's retrieval when the index lags the newest encoder (docs/design.md, "Snapshots").

The indexer refreshes the index within a compute share (docs/design.md, "Index upkeep"), so
on a large store the live index can hold vectors of an encoder several experiences old. Its
nearest neighbours are then not the newest encoder's. A snapshot corrects that at query time:
the live index retrieves a pool of `pool` x the budget (the merge of `replay.retrieval`), the
newest checkpoint's encoder embeds the pool and the targets, and the budget is picked again
from the pool by those vectors (`replay.retrieval.rerank_budget`). The cost is the pool's
embeddings, a chunk at a time, so memory stays bounded whatever the budget; in the daemon on a
CPU each chunk takes its turn on the cores with the training step (`deploy/compute_turns.py`).

Usage (what `SnapshotEngine._rerank` does)::

    pool = retrieve_budget(index, stale_queries, budget * RERANK_POOL)  # 16 budgets
    ids, vectors = embed_stored(newest, read, pool, decode_size, limits)
    picked = rerank_budget(ids, vectors, newest(targets), budget)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from deploy.indexer import Encoder, decode_images
from streamer.limits import DecodeLimits

RERANK_POOL = 16
"""Default pool, in budgets, that a lagging index retrieves for the newest encoder to re-rank:
on a 100k store up to five versions behind, 16 budgets of 2,000 found 0.89-0.98 of a full
re-embed's retrieval and 4 budgets 0.62-0.78 (docs/scaling.md, "Index upkeep")."""
RERANK_MAX_POOL = 32_768
"""Most samples one snapshot re-ranks (~26 s on 2 CPU cores at 32 px): 16 budgets of the largest
default budget (2,000) fit; an explicit larger budget gets a smaller multiple."""
CHUNK = 256  # stored samples read, decoded and embedded at a time

ReadStored = Callable[[list[str]], tuple[list, list[bytes]]]
"""(sample ids) -> (catalog rows of those still stored, their encoded bytes): the engine's `_read`."""


def embed_stored(encoder: Encoder, read: ReadStored, sample_ids: list[str], size: int, limits: DecodeLimits,
                 turns: AbstractContextManager | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, (P, D) vectors) of the stored samples among `sample_ids` under `encoder`; ids evicted
    meanwhile or that no longer decode are left out. `turns`: held around each chunk's embedding."""
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for first in range(0, len(sample_ids), CHUNK):
        rows, encoded = read(sample_ids[first:first + CHUNK])
        images, kept = decode_images(encoded, size, limits)  # (C, 3, S, S) uint8
        if kept:
            ids += [rows[i].sample_id for i in kept]
            with turns or nullcontext():
                parts.append(encoder(images))  # (C, D)
    return ids, np.concatenate(parts) if parts else np.empty((0, 0), np.float32)
