"""Versioned FAISS index of stored-sample embeddings, one per encoder version.

Embeddings from two encoder versions are not comparable, so each version has
its own index: a new one is built to the side (``build``) and published with
``swap`` while searches keep using the old one. On disk, under
``root/index/``, every publication is an immutable directory
``v{version:06d}.g{generation:06d}/`` holding ``index.faiss`` (or, for a
sharded index, one ``shard-NNN.faiss`` per shard), ``ids.json`` (FAISS label
→ sample id, experience) and ``manifest.json`` (sha256 and size of every other
file); it is written under a temporary name, fsynced and renamed into place, then
``CURRENT`` is flipped by tmp + rename. ``save`` publishes a new generation
of the live version the same way, so a crash never leaves a torn index live.
Vectors are L2-normalized: inner product is cosine similarity.

Past ``shard_max`` vectors per shard an index is split into shards, searched in
parallel on a thread pool and merged into one top-k; labels stay global, so the
label → sample id map does not care where a vector lives.

With ``ondisk`` an IVF shard keeps its inverted lists out of RAM: each publication holds one
compact ``*.ivfdata`` list file per shard, and the live table memory-maps the newest one
read-only (FAISS ``OnDiskInvertedLists``), so pages are read on demand and stay reclaimable
page cache. Vectors added since the last publication sit in a small in-RAM IVF with the same
quantizer, searched alongside; removals are tombstones. Publishing rewrites base + added -
removed into the new publication's list files and re-maps them, so published files are never
written again (FAISS corrupts on-disk lists it adds to or shrinks: faiss issue #3498).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from safefiles.files import file_matches, fsync_path, write_synced
from safefiles.publish import MANIFEST as MANIFEST_FILE
from safefiles.publish import flip_pointer, publish_dir, read_pointer, staging_dir

INDEX_FILE = "index.faiss"
SHARD_FILE = "shard-{:03d}.faiss"  # index.faiss of each shard of a sharded index
LISTS_SUFFIX = ".ivfdata"  # inverted lists of an on-disk IVF shard, named after its .faiss file
IDS_FILE = "ids.json"
CURRENT_FILE = "CURRENT"
HNSW_REBUILD_DEAD = 0.25  # rebuild an HNSW index once this fraction of it is tombstones
# Published lists are read for their metadata only, then mapped read-only from their own file.
ONDISK_READ_FLAGS = faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
ID_BYTES = 8  # an inverted list entry is its code followed, list-wise, by an int64 id
# Searches shards in parallel (faiss releases the GIL); threads start on first use.
_FANOUT = ThreadPoolExecutor(max_workers=os.cpu_count() or 4, thread_name_prefix="index-shard")


@dataclass(frozen=True)
class IndexOptions:
    """How indexes are built: shards of at most ``shard_max`` vectors (0: one shard), each
    exact up to ``exact_max`` vectors, then ``kind``."""

    exact_max: int = 50_000
    kind: str = "ivf"  # "ivf" | "hnsw"
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    gpu: bool = False  # search on GPU copies when faiss has GPU support and a GPU is present
    shard_max: int = 0
    ondisk: bool = False  # IVF shards serve their lists memory-mapped from the publication


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


class TableSnapshot(NamedTuple):
    """A table frozen for publication: its kind, size, file contents by file name, and the
    sha256 of the list files it already wrote into the publication directory."""

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
    and ignore the caller's ``faiss.omp_set_num_threads`` (what FAISS's own threaded
    ``IndexShards`` does: several times slower than one shard on 2 cores, measured).
    """
    faiss.omp_set_num_threads(threads)
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


def _lists_file(shard_file: str) -> str:
    """The list file of an on-disk shard: ``shard-000.faiss`` → ``shard-000.ivfdata``."""
    return Path(shard_file).stem + LISTS_SUFFIX


def _ivf_sibling(ivf: faiss.IndexIVF) -> faiss.IndexIVFFlat:
    """An empty in-RAM IVF with a copy of ``ivf``'s trained quantizer and its nprobe."""
    sibling = faiss.IndexIVFFlat(
        faiss.clone_index(ivf.quantizer), ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT
    )
    sibling.nprobe = ivf.nprobe
    return sibling


def _entries(lists: faiss.InvertedLists, list_no: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes) of one inverted list, as views of FAISS's memory (no copy)."""
    n, code_size = lists.list_size(list_no), lists.code_size
    if n == 0:
        return np.empty(0, np.int64), np.empty((0, code_size), np.uint8)
    ids = faiss.rev_swig_ptr(lists.get_ids(list_no), n)
    return ids, faiss.rev_swig_ptr(lists.get_codes(list_no), n * code_size).reshape(n, code_size)


def _write_lists(
    parts: list[faiss.IndexIVF], dead: np.ndarray, path: Path
) -> tuple[np.ndarray, str]:
    """Write the lists of ``parts`` (IVFs with one quantizer), minus the ``dead`` labels, to
    ``path`` in the layout of a compact ``OnDiskInvertedLists``: list after list, its codes then
    its ids. Streams one list at a time. Returns (entries per list, sha256 of the file)."""
    nlist = parts[0].nlist
    sizes = np.zeros(nlist, dtype=np.uint64)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for list_no in range(nlist):
            entries = [_entries(part.invlists, list_no) for part in parts]
            ids = np.concatenate([ids for ids, _ in entries])
            keep = ~np.isin(ids, dead)
            sizes[list_no] = keep.sum()
            for block in (np.concatenate([codes for _, codes in entries])[keep], ids[keep]):
                f.write(block)
                digest.update(block)
    return sizes, digest.hexdigest()


def _ondisk_shard(like: faiss.IndexIVF, sizes: np.ndarray, lists_file: str) -> faiss.IndexIVFFlat:
    """An IVF with ``like``'s quantizer whose lists are the compact file ``lists_file`` holding
    ``sizes`` entries per list (not mapped yet: it serializes to metadata only)."""
    shard = _ivf_sibling(like)
    lists = faiss.OnDiskInvertedLists(shard.nlist, shard.code_size, lists_file)
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    shard.ntotal = int(sizes.sum())
    lists.totsize = shard.ntotal * (shard.code_size + ID_BYTES)
    shard.replace_invlists(lists, True)
    lists.this.disown()  # owned by the shard now
    return shard


def _map_lists(shard: faiss.IndexIVF, path: Path) -> faiss.IndexIVF:
    """Serve ``shard``'s on-disk lists from ``path``, memory-mapped read-only.

    Pages are read on demand and stay reclaimable page cache; nothing is copied into the heap,
    and a write to the file is impossible. No prefetch threads (FAISS starts up to 32 per search).
    """
    lists = faiss.downcast_InvertedLists(shard.invlists)
    lists.filename, lists.read_only, lists.prefetch_nthread = str(path), True, 0
    if lists.totsize:  # mmap refuses an empty file
        lists.do_mmap()
    return shard


def _ondisk(kind: str, options: IndexOptions) -> bool:
    return kind == "ivf" and options.ondisk


def _deserialize(data: bytes, flags: int = 0) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, np.uint8), flags)


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
    since, removals are tombstones, and ``snapshot`` folds both into new list files.
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
        return cls(kind, [_new_faiss(kind, dim, vectors, options)], options, bases)

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
            shard = _ivf_sibling(first)
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
                for shard in self.shards:  # a shard ignores labels it does not hold
                    shard.remove_ids(gone)
            self._gpu_shards = None
        return len(labels)

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
        if len(shards) == 1:
            dist, labels = shards[0].search(q, kk, params=params)
        else:  # fan out, sharing the caller's FAISS threads (at least one per shard)
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

    def snapshot(self, into: Path) -> TableSnapshot:
        """The table's files: ``ids.json`` plus ``index.faiss``, or one file per shard.

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
            return TableSnapshot(self.layout, self.size, files, {})
        dead = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
        bases, lists = [], {}
        for name, parts in zip(names, self._parts(), strict=True):
            lists_file = _lists_file(name)
            sizes, lists[lists_file] = _write_lists(parts, dead, into / lists_file)
            base = _ondisk_shard(parts[0], sizes, lists_file)
            files[name] = faiss.serialize_index(base).tobytes()
            bases.append(_map_lists(base, into / lists_file))
        self.bases, self.shards = bases, [_ivf_sibling(base) for base in bases]
        self.dead, self._selector = set(), None
        return TableSnapshot(self.layout, self.size, files, lists)

    @classmethod
    def deserialize(
        cls, files: dict[str, bytes], options: IndexOptions, lists: dict[str, Path]
    ) -> Table:
        """The table ``snapshot`` wrote; KeyError if one of its files is missing.

        ``lists`` are the verified list files of an on-disk table by name: they are mapped
        read-only, not read. An in-RAM IVF table loaded with ``options.ondisk`` moves its
        lists to disk at its next publication.
        """
        meta = json.loads(files[IDS_FILE])
        names = _shard_files(meta.get("shards", 1))
        if meta.get("ondisk"):
            bases = [
                _map_lists(_deserialize(files[name], ONDISK_READ_FLAGS), lists[_lists_file(name)])
                for name in names
            ]
            table = cls(meta["kind"], [_ivf_sibling(base) for base in bases], options, bases)
        else:
            shards = [_deserialize(files[name]) for name in names]
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


@dataclass
class BuiltIndex:
    """An index built for ``version`` but not yet live; top it up with ``add`` before ``swap``."""

    version: int
    table: Table
    dim: int

    @property
    def size(self) -> int:
        return self.table.size

    def add(self, vectors: np.ndarray, sample_ids: list[str], experiences: list[int]) -> int:
        return self.table.add(normalized(vectors, self.dim), sample_ids, experiences)


def _parse_dir(name: str) -> tuple[int, int] | None:
    """(version, generation) of ``v000002.g000003``, None for anything else."""
    version, _, generation = name.partition(".g")
    if not (version.startswith("v") and version[1:].isdigit() and generation.isdigit()):
        return None
    return int(version[1:]), int(generation)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class VectorIndex:
    """The live index of the current encoder version, plus its published history on disk.

    Thread-safe: ``search``/``add``/``remove`` hold one lock over the live
    table; ``swap`` only takes it to flip the pointer, so a search sees either
    the old or the new index, never a mix.
    """

    def __init__(
        self,
        root: Path,
        dim: int,
        *,
        exact_max: int = 50_000,
        kind: str = "ivf",
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        gpu: bool = False,
        shard_max: int = 0,
        ondisk: bool = False,
    ) -> None:
        if kind not in ("ivf", "hnsw"):
            raise ValueError(f"kind must be 'ivf' or 'hnsw', not {kind!r}")
        if shard_max < 0:
            raise ValueError(f"shard_max must be >= 0, not {shard_max}")
        if ondisk and kind != "ivf":
            raise ValueError("ondisk keeps IVF lists on disk: it needs kind='ivf'")
        self.dir = Path(root) / "index"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.options = IndexOptions(
            exact_max, kind, nprobe, hnsw_m, ef_search, gpu, shard_max, ondisk
        )
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._version: int | None = None
        self._table: Table | None = None

    @property
    def current_version(self) -> int | None:
        return self._version

    @property
    def size(self) -> int:
        with self._lock:
            return self._table.size if self._table else 0

    @property
    def kind(self) -> str | None:
        """Kind of the live index: "flat", "ivf" or "hnsw", prefixed "shards:" when it is
        sharded (None before the first add/load)."""
        with self._lock:
            return self._table.layout if self._table else None

    def _kind_for(self, n: int) -> str:
        """Kind of a table built from ``n`` vectors: flat while each of its shards fits exact_max."""
        shards = math.ceil(n / self.options.shard_max) if self.options.shard_max else 1
        per_shard = math.ceil(n / max(1, shards))
        return "flat" if per_shard <= self.options.exact_max else self.options.kind

    def _table_from(self, x: np.ndarray, sample_ids: list[str], experiences: list[int]) -> Table:
        table = Table.create(self._kind_for(len(x)), self.dim, x, self.options)
        table.add(x, sample_ids, experiences)
        return table

    def add(
        self, version: int, vectors: np.ndarray, sample_ids: list[str], experiences: list[int]
    ) -> int:
        """Add to the live index of ``version`` (the first add creates it). Returns vectors added.

        A flat shard crossing ``exact_max`` converts the live index to IVF/HNSW (once, under
        the lock); past ``shard_max`` vectors per shard, new shards open.
        """
        x = normalized(vectors, self.dim)
        with self._lock:
            if self._table is None:
                self._version, self._table = (
                    version,
                    Table.create("flat", self.dim, x, self.options),
                )
            elif version != self._version:
                raise ValueError(
                    f"live index is encoder version {self._version}; build and swap in {version}"
                )
            added = self._table.add(x, sample_ids, experiences)
            if self._table.kind == "flat" and self._table.largest > self.options.exact_max:
                self._table = self._table_from(*self._table.live_vectors())
            return added

    def centroids(self) -> dict[int, np.ndarray]:
        """Unit-length mean vector of each experience's indexed samples, by experience.

        Flat and HNSW indexes only (IVF cannot give its vectors back): {} otherwise.
        """
        with self._lock:
            if self._table is None or self._table.kind == "ivf" or self._table.size == 0:
                return {}
            vectors, _, experiences = self._table.live_vectors()
        return {int(e): normalized(vectors[experiences == e].mean(0, keepdims=True), self.dim)[0]
                for e in np.unique(experiences)}

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Cosine k-NN of ``queries`` (M, D) in the live index."""
        q = normalized(queries, self.dim)
        with self._lock:
            if self._table is None:
                return SearchResult.empty(len(q), k)
            return self._table.search(q, k)

    def remove(self, sample_ids: list[str]) -> int:
        """Drop samples (e.g. evicted by the store) from the live index. Returns vectors removed."""
        with self._lock:
            if self._table is None:
                return 0
            removed = self._table.remove(sample_ids)
            table = self._table
            if table.kind == "hnsw" and len(table.dead) > HNSW_REBUILD_DEAD * table.ntotal:
                self._table = self._table_from(*table.live_vectors())
            return removed

    def build(
        self, version: int, vectors: np.ndarray, sample_ids: list[str], experiences: list[int]
    ) -> BuiltIndex:
        """A new index for ``version``, built without touching the live one (any thread)."""
        x = normalized(vectors, self.dim)
        return BuiltIndex(version, self._table_from(x, sample_ids, experiences), self.dim)

    def swap(self, built: BuiltIndex) -> None:
        """Publish ``built`` on disk, flip CURRENT, make it live, prune old versions."""
        with self._publish_lock:
            with staging_dir(self.dir, "publish") as staging:
                self._commit(staging, built.version, built.table.snapshot(staging))
            with self._lock:
                self._version, self._table = built.version, built.table
            self._prune()

    def save(self) -> None:
        """Publish the live index as a new generation of its version (crash-safe).

        An on-disk table writes its list files under the lock (searches wait, as they wait
        for an in-RAM index's serialization) and is served from them afterwards."""
        with self._publish_lock:
            with staging_dir(self.dir, "publish") as staging:
                with self._lock:
                    if self._table is None:
                        staging.rmdir()
                        return
                    version, snapshot = self._version, self._table.snapshot(staging)
                self._commit(staging, version, snapshot)
            self._prune()

    def _dirs(self) -> list[tuple[int, int, Path]]:
        """Published directories as (version, generation, path), oldest first."""
        found = []
        for path in self.dir.iterdir():
            parsed = _parse_dir(path.name)
            if parsed and path.is_dir():
                found.append((*parsed, path))
        return sorted(found)

    def _commit(self, staging: Path, version: int, snapshot: TableSnapshot) -> None:
        """Write ``snapshot``'s files and a manifest (sha256 and size of every file) into
        ``staging``, fsync all of it, publish it as the next generation of ``version`` and flip
        CURRENT to it (``safefiles.publish``)."""
        for fname, data in snapshot.files.items():
            write_synced(staging / fname, data)
        for fname in snapshot.lists:  # written by the snapshot: only made durable here
            fsync_path(staging / fname)
        generation = 1 + max((g for v, g, _ in self._dirs() if v == version), default=0)
        name = f"v{version:06d}.g{generation:06d}"
        sums = {fname: _sha256(data) for fname, data in snapshot.files.items()} | snapshot.lists
        manifest = {
            "version": version,
            "generation": generation,
            "dim": self.dim,
            "kind": snapshot.kind,
            "size": snapshot.size,
            "sha256": sums,
            "bytes": {fname: (staging / fname).stat().st_size for fname in sums},
        }
        publish_dir(staging, self.dir / name, json.dumps(manifest).encode())
        flip_pointer(self.dir / CURRENT_FILE, name)

    def _prune(self) -> None:
        """Keep CURRENT and the newest directory of the version before it; delete the rest."""
        current = read_pointer(self.dir / CURRENT_FILE)
        version = _parse_dir(current)[0]
        older = [path for v, _, path in self._dirs() if v < version]
        keep = {current, older[-1].name if older else current}
        for path in self.dir.iterdir():
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _read_valid(self, path: Path) -> tuple[dict, Table] | None:
        """The manifest and table of a published directory, or None if it is torn.

        Every file the manifest lists must match its sha256, and the table must find all
        of its files among them. List files are checked against their recorded size first,
        then hashed in a streaming read (page cache, not heap) before they are mapped.
        """
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_bytes())
            sums = manifest["sha256"]
            if manifest["dim"] != self.dim or any(Path(name).name != name for name in sums):
                return None
            lists = {name: path / name for name in sums if name.endswith(LISTS_SUFFIX)}
            sizes = {name: manifest["bytes"][name] for name in lists}
            files = {name: (path / name).read_bytes() for name in sums if name not in lists}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if any(_sha256(data) != sums[name] for name, data in files.items()):
            return None
        if not all(file_matches(file, sums[name], sizes[name]) for name, file in lists.items()):
            return None
        try:
            return manifest, Table.deserialize(files, self.options, lists)
        except KeyError:  # the manifest does not list a file the table needs
            return None

    def load(self) -> int | None:
        """Make the CURRENT directory live (else the newest valid one); returns its version.

        Torn or mismatched directories (bad manifest, sha256 or dim) are ignored.
        """
        with self._publish_lock:
            current = read_pointer(self.dir / CURRENT_FILE)
            candidates = [path for _, _, path in reversed(self._dirs())]
            candidates.sort(key=lambda path: path.name != current)
            for path in candidates:
                loaded = self._read_valid(path)
                if loaded is not None:
                    manifest, table = loaded
                    with self._lock:
                        self._version, self._table = manifest["version"], table
                    return manifest["version"]
            return None

    def sizes_by_version(self) -> dict[int, int]:
        """Vectors per encoder version: published manifests, the live index overriding."""
        sizes: dict[int, int] = {}
        for version, _, path in self._dirs():
            try:
                sizes[version] = json.loads((path / MANIFEST_FILE).read_bytes())["size"]
            except (OSError, ValueError, KeyError):
                continue
        with self._lock:
            if self._table is not None:
                sizes[self._version] = self._table.size
        return sizes
