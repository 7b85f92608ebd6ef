"""How vector indexes are built: ``IndexOptions``, the one set of index defaults.

The daemon builds it from its settings (``Settings.index_options``), so the library, the
indexer and the offline snapshot engine all read the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("ivf", "hnsw")


@dataclass(frozen=True)
class IndexOptions:
    """How indexes are built: shards of at most ``shard_max`` vectors (0: one shard), each
    exact up to ``exact_max`` vectors, then ``kind``."""

    exact_max: int = 200_000
    kind: str = "ivf"  # "ivf" | "hnsw"
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    gpu: bool = False  # search on GPU copies when faiss has GPU support and a GPU is present
    shard_max: int = 0
    ondisk: bool = False  # IVF shards serve their lists memory-mapped from the publication
    threads: int = 0  # FAISS OpenMP threads of each add, build, removal and search (0: the caller's)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be 'ivf' or 'hnsw', not {self.kind!r}")
        if self.shard_max < 0:
            raise ValueError(f"shard_max must be >= 0, not {self.shard_max}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, not {self.threads}")
        if self.ondisk and self.kind != "ivf":
            raise ValueError("ondisk keeps IVF lists on disk: it needs kind='ivf'")
