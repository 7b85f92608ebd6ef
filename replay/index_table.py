"""The sharded FAISS table behind one index version: labels, tombstones, search fan-out.

A ``Table`` is FAISS shards plus label → (sample id, experience). Past
``IndexOptions.shard_max`` vectors per shard it opens new shards, searched in parallel on a
thread pool and merged into one top-k; labels stay global, so the label → sample id map does
not care where a vector lives. Removals delete in place, or become tombstones (HNSW, on-disk
IVF) filtered at search time. ``publish``/``deserialize`` turn a table into the files of a
publication and back (``replay/index.py`` writes and verifies them). Vectors are
L2-normalized: inner product is cosine similarity.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from replay.faiss_threads import faiss_threads
from replay.index_lists import (
    ONDISK_READ_FLAGS,
    deserialize_index,
    ivf_sibling,
    lists_file,
    map_lists,
    ondisk_shard,
    write_lists,
)
from replay.index_options import IndexOptions

INDEX_FILE = "index.faiss"
SHARD_FILE = "shard-{:03d}.faiss"  # index.faiss of each shard of a sharded index
IDS_FILE = "ids.json"
# Searches shards in parallel (faiss releases the GIL); threads start on first use.
_FANOUT = ThreadPoolExecutor(max_workers=os.cpu_count() or 4, thread_name_prefix="index-shard")


class SearchResult(NamedTuple):
    """Neighbours per query; empty slots have score -inf, sample id "" and experience -1."""

    scores: np.ndarray  # (M, k) float32 cosine similarity
    sample_ids: list[list[str]]
    experiences: np.ndarray  # (M, k) int64

    @classmethod
    def empty(cls, m: int, k: int) -> SearchResult:
        return cls(
            np.full((m, k), -np.inf, dtype=np.float32),
            [[""] * k for _ in range(m)],
            np.full((m, k), -1, dtype=np.int64),
        )


class TableFiles(NamedTuple):
    """A table written out for a publication: its kind, size, file contents by file name,
    and the sha256 of the list files it already wrote into the publication directory."""

    kind: str
    size: int
    files: dict[str, bytes]
    lists: dict[str, str]


def normalized(vectors: np.ndarray, dim: int) -> np.ndarray:
    """A float32 C-contiguous copy with unit-norm rows."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (N, {dim}), got {x.shape}")
    faiss.normalize_L2(x)
    return x


def _gpu_available() -> bool:
    return (
        hasattr(faiss, "index_cpu_to_all_gpus")
        and hasattr(faiss, "get_num_gpus")
        and faiss.get_num_gpus() > 0
    )


def _new_faiss(kind: str, dim: int, train: np.ndarray, options: IndexOptions) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(hnsw)
    if kind != "ivf":
        raise ValueError(f"unknown index kind {kind!r}")
    nlist = max(1, min(int(math.sqrt(len(train))), len(train) // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    index.nprobe = min(options.nprobe, nlist)
    return index


def _search_shard(
    shard: faiss.Index, q: np.ndarray, k: int, params: faiss.SearchParameters | None, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """One shard's top-k on a fan-out thread, with ``threads`` FAISS threads.

    OpenMP thread counts are per thread: without this a pool thread would use every core
    and ignore the caller's count (what FAISS's own threaded ``IndexShards`` does: several
    times slower than one shard on 2 cores, measured).
    """
    with faiss_threads(threads):
        return shard.search(q, k, params=params)


def _merge(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (highest inner product) of several shards' (scores, labels), best first.

    A shard's padding (label -1, score -FLT_MAX) sorts after every cosine similarity.
    """
    scores = np.concatenate([s for s, _ in results], axis=1)
    labels = np.concatenate([lab for _, lab in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


def _shard_files(shards: int) -> list[str]:
    """File names of a table's shards: ``index.faiss`` alone (the unsharded format) or one per shard."""
    return [INDEX_FILE] if shards == 1 else [SHARD_FILE.format(i) for i in range(shards)]


def _ondisk(kind: str, options: IndexOptions) -> bool:
    return kind == "ivf" and options.ondisk


class Table:
    """FAISS shards plus label → (sample id, experience). Labels are global and never reused.

    One shard is searched directly; several are searched in parallel and their top-k
    merged. All shards of a table have one kind. Adds go to the shards with the fewest
    vectors, and a new shard opens once every shard holds ``options.shard_max`` (IVF
    shards share the first shard's trained quantizer, so splitting an IVF index does not
    change its results). Flat and HNSW shards sit in an
    ``IndexIDMap2``; IVF takes ids natively. HNSW cannot delete in place, so removed
    labels become tombstones filtered by an ``IDSelector`` until the index is rebuilt.

    An on-disk IVF table (``bases`` not None) pairs each shard with its published lists,
    mapped read-only (None until first published): ``shards`` then hold only what was added
    since, removals are tombstones, and ``publish`` folds both into new list files.
    """

    def __init__(
        self,
        kind: str,
        shards: list[faiss.Index],
        options: IndexOptions,
        bases: list[faiss.Index | None] | None = None,
    ) -> None:
        self.kind = kind
        self.shards = shards
        self.bases = bases
        self.options = options
        self.ids: list[str | None] = []
        self.exps = np.zeros(1024, dtype=np.int64)  # by label, grown by doubling
        self.label_of: dict[str, int] = {}
        self.dead: set[int] = set()
        self._selector: tuple | None = None
        self._gpu_shards: list[faiss.Index] | None = None  # reset on every change

    @classmethod
    def create(cls, kind: str, dim: int, vectors: np.ndarray, options: IndexOptions) -> Table:
        """An empty one-shard table of ``kind``; IVF is trained on ``vectors`` (normalized)."""
        bases = [None] if _ondisk(kind, options) else None
        with faiss_threads(options.threads):
            shard = _new_faiss(kind, dim, vectors, options)
        return cls(kind, [shard], options, bases)

    @property
    def size(self) -> int:
        return len(self.label_of)

    @property
    def ondisk(self) -> bool:
        """Whether the shards' published lists are served from disk."""
        return self.bases is not None

    def _parts(self) -> list[list[faiss.Index]]:
        """Per shard, the FAISS indexes holding its vectors: its published lists, if mapped,
        then its in-RAM index."""
        bases = self.bases or [None] * len(self.shards)
        return [
            [part for part in (base, shard) if part is not None]
            for base, shard in zip(bases, self.shards, strict=True)
        ]

    def _counts(self) -> list[int]:
        """Vectors per shard, tombstones included."""
        return [sum(part.ntotal for part in parts) for parts in self._parts()]

    @property
    def ntotal(self) -> int:
        """Vectors in the FAISS shards, tombstones included."""
        return sum(self._counts())

    @property
    def largest(self) -> int:
        """Vectors in the fullest shard: what one search thread scans."""
        return max(self._counts())

    @property
    def layout(self) -> str:
        """The kind, prefixed "shards:" when searches fan out over several shards."""
        return f"shards:{self.kind}" if len(self.shards) > 1 else self.kind

    def _open_shard(self) -> None:
        first = self.shards[0]
        if self.kind == "ivf":
            shard = ivf_sibling(first)
        else:
            shard = _new_faiss(self.kind, first.d, np.empty((0, first.d), np.float32), self.options)
        self.shards.append(shard)
        if self.bases is not None:
            self.bases.append(None)

    def _spread(self, n: int) -> list[int]:
        """How many of ``n`` new vectors each shard takes: fewest-first (water-filling),
        none past ``shard_max``, opening shards while the existing ones lack room."""
        cap = self.options.shard_max
        if cap:
            room = sum(max(0, cap - count) for count in self._counts())
            for _ in range(math.ceil(max(0, n - room) / cap)):
                self._open_shard()
        counts = np.array(self._counts(), dtype=np.int64)
        upper = np.maximum(counts, cap) if cap else counts + n
        lo, hi = int(counts.min()), int(upper.max())  # fill to the lowest level that fits n
        while lo < hi:
            mid = (lo + hi) // 2
            if np.clip(mid - counts, 0, upper - counts).sum() >= n:
                hi = mid
            else:
                lo = mid + 1
        give = np.clip(lo - 1 - counts, 0, upper - counts)
        short = n - int(give.sum())
        give[np.flatnonzero(counts + give < np.minimum(lo, upper))[:short]] += 1
        return give.tolist()

    def add(self, x: np.ndarray, sample_ids: list[str], experiences: list[int]) -> int:
        """Add normalized vectors; ids already present are skipped. Returns vectors added."""
        if not len(x) == len(sample_ids) == len(experiences):
            raise ValueError("vectors, sample_ids and experiences differ in length")
        keep, fresh = [], set()
        for i, sid in enumerate(sample_ids):
            if sid not in self.label_of and sid not in fresh:
                fresh.add(sid)
                keep.append(i)
        if not keep:
            return 0
        start = len(self.ids)
        labels = np.arange(start, start + len(keep), dtype=np.int64)
        kept = x[keep]
        first = 0
        with faiss_threads(self.options.threads):
            for shard, count in zip(self.shards, self._spread(len(keep)), strict=True):
                if count:
                    shard.add_with_ids(kept[first : first + count], labels[first : first + count])
                    first += count
        if len(self.exps) < start + len(keep):
            grown = np.zeros(max(2 * len(self.exps), start + len(keep)), dtype=np.int64)
            grown[:start] = self.exps[:start]
            self.exps = grown
        self.exps[labels] = np.asarray(experiences, dtype=np.int64)[keep]
        for label, i in zip(labels.tolist(), keep, strict=True):
            self.ids.append(sample_ids[i])
            self.label_of[sample_ids[i]] = label
        self._gpu_shards = None
        return len(keep)

    def remove(self, sample_ids: list[str]) -> int:
        labels = [self.label_of.pop(s) for s in set(sample_ids) if s in self.label_of]
        for label in labels:
            self.ids[label] = None
        if labels:
            if self.kind == "hnsw" or self.ondisk:
                self.dead.update(labels)
                self._selector = None
            else:
                gone = np.array(labels, dtype=np.int64)
                with faiss_threads(self.options.threads):
                    for shard in self.shards:  # a shard ignores labels it does not hold
                        shard.remove_ids(gone)
            self._gpu_shards = None
        return len(labels)

    def hand_over(self, filed: dict[str, int]) -> int:
        """File indexed samples under other experiences (sample id -> experience: a drift
        boundary's tail). Returns how many were indexed."""
        known = [(self.label_of[sid], exp) for sid, exp in filed.items() if sid in self.label_of]
        for label, experience in known:
            self.exps[label] = experience
        return len(known)

    def live_vectors(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(vectors, sample ids, experiences) still indexed; flat and HNSW tables only."""
        vectors, labels = [], []
        for shard in self.shards:
            inner = faiss.downcast_index(shard.index)
            vectors.append(inner.reconstruct_n(0, inner.ntotal))
            labels.append(faiss.vector_to_array(shard.id_map))
        all_vectors, all_labels = np.concatenate(vectors), np.concatenate(labels)
        live = np.array([self.ids[label] is not None for label in all_labels], dtype=bool)
        all_labels = all_labels[live]
        return all_vectors[live], [self.ids[label] for label in all_labels], self.exps[all_labels]

    def _params(self, k: int) -> faiss.SearchParameters | None:
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.options.ef_search, k))
        elif self.dead:  # on-disk IVF tombstones; IVF parameters replace the index's nprobe
            params = faiss.SearchParametersIVF(nprobe=self.shards[0].nprobe)
        else:
            return None
        if self.dead:
            if self._selector is None:
                batch = faiss.IDSelectorBatch(np.fromiter(self.dead, dtype=np.int64))
                self._selector = (batch, faiss.IDSelectorNot(batch))
            params.sel = self._selector[1]
        return params

    def _searchable(self) -> list[faiss.Index]:
        """The shards to search: GPU copies when enabled and possible, else the shards.

        An on-disk table searches every non-empty part of its shards, on the CPU (a GPU copy
        would load the lists, and tombstones need an ``IDSelector``).
        """
        if self.ondisk:
            return [part for parts in self._parts() for part in parts if part.ntotal]
        if not self.options.gpu or self.kind == "hnsw" or not _gpu_available():
            return self.shards
        if self._gpu_shards is None:
            self._gpu_shards = [faiss.index_cpu_to_all_gpus(shard) for shard in self.shards]
        return self._gpu_shards

    def search(self, q: np.ndarray, k: int) -> SearchResult:
        """k nearest neighbours of normalized queries ``q``, padded when fewer exist."""
        scores, ids, exps = result = SearchResult.empty(len(q), k)
        kk = min(k, self.ntotal)
        if kk == 0 or len(q) == 0:
            return result
        shards, params = self._searchable(), self._params(kk)
        with faiss_threads(self.options.threads):
            if len(shards) == 1:
                dist, labels = shards[0].search(q, kk, params=params)
            else:  # fan out, sharing the FAISS threads (at least one per shard)
                threads = max(1, faiss.omp_get_max_threads() // len(shards))
                found = _FANOUT.map(_search_shard, shards, repeat(q), repeat(kk), repeat(params),
                                    repeat(threads))
                dist, labels = _merge(list(found), kk)
        valid = labels >= 0
        scores[:, :kk] = np.where(valid, dist, -np.inf)
        exps[:, :kk] = np.where(valid, self.exps[np.maximum(labels, 0)], -1)
        for row, out in zip(labels.tolist(), ids, strict=True):
            out[:kk] = [self.ids[label] if label >= 0 else "" for label in row]
        return result

    def publish(self, into: Path) -> TableFiles:
        """Write the table out for a publication in ``into``: returns its files (``ids.json``
        plus ``index.faiss``, or one file per shard) for the caller to write.

        An on-disk table also writes each shard's list file (published + added - removed) into
        the publication directory ``into`` and serves its lists from there from now on: its
        in-RAM additions and tombstones are dropped.
        """
        live = sorted(self.label_of.values())
        ids = {
            "kind": self.kind,
            "shards": len(self.shards),
            "next_label": len(self.ids),
            "labels": live,
            "sample_ids": [self.ids[label] for label in live],
            "experiences": self.exps[live].tolist(),
            "dead": [] if self.ondisk else sorted(self.dead),
            "ondisk": self.ondisk,
        }
        files = {IDS_FILE: json.dumps(ids).encode()}
        names = _shard_files(len(self.shards))
        if not self.ondisk:
            for name, shard in zip(names, self.shards, strict=True):
                files[name] = faiss.serialize_index(shard).tobytes()
            return TableFiles(self.layout, self.size, files, {})
        dead = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
        bases, lists = [], {}
        for name, parts in zip(names, self._parts(), strict=True):
            lists_name = lists_file(name)
            sizes, lists[lists_name] = write_lists(parts, dead, into / lists_name)
            base = ondisk_shard(parts[0], sizes, lists_name)
            files[name] = faiss.serialize_index(base).tobytes()
            bases.append(map_lists(base, into / lists_name))
        self.bases, self.shards = bases, [ivf_sibling(base) for base in bases]
        self.dead, self._selector = set(), None
        return TableFiles(self.layout, self.size, files, lists)

    @classmethod
    def deserialize(
        cls, files: dict[str, bytes], options: IndexOptions, lists: dict[str, Path]
    ) -> Table:
        """The table ``publish`` wrote out; KeyError if one of its files is missing.

        ``lists`` are the verified list files of an on-disk table by name: they are mapped
        read-only, not read. An in-RAM IVF table loaded with ``options.ondisk`` moves its
        lists to disk at its next publication.
        """
        meta = json.loads(files[IDS_FILE])
        names = _shard_files(meta.get("shards", 1))
        if meta.get("ondisk"):
            bases = [
                map_lists(deserialize_index(files[name], ONDISK_READ_FLAGS), lists[lists_file(name)])
                for name in names
            ]
            table = cls(meta["kind"], [ivf_sibling(base) for base in bases], options, bases)
        else:
            shards = [deserialize_index(files[name]) for name in names]
            bases = [None] * len(shards) if _ondisk(meta["kind"], options) else None
            table = cls(meta["kind"], shards, options, bases)
        table.ids = [None] * meta["next_label"]
        table.exps = np.zeros(max(1024, meta["next_label"]), dtype=np.int64)
        for label, sid, exp in zip(
            meta["labels"], meta["sample_ids"], meta["experiences"], strict=True
        ):
            table.ids[label] = sid
            table.exps[label] = exp
            table.label_of[sid] = label
        table.dead = set(meta["dead"])
        return table
