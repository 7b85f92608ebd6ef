"""Versioned FAISS index of stored-sample embeddings, one per encoder version.

Embeddings from two encoder versions are not comparable, so each version has
its own index: a new one is built to the side (``build``) and published with
``swap`` while searches keep using the old one. On disk, under
``root/index/``, every publication is an immutable directory
``v{version:06d}.g{generation:06d}/`` holding ``index.faiss``, ``ids.json``
(FAISS label → sample id, experience) and ``manifest.json`` (sha256 of both);
it is written under a temporary name, fsynced and renamed into place, then
``CURRENT`` is flipped by tmp + rename. ``save`` publishes a new generation
of the live version the same way, so a crash never leaves a torn index live.
Vectors are L2-normalized: inner product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np

from replay.atomic import fsync_dir, write_atomic

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"
HNSW_REBUILD_DEAD = 0.25  # rebuild an HNSW index once this fraction of it is tombstones


@dataclass(frozen=True)
class IndexOptions:
    """How indexes are built: exact up to ``exact_max`` vectors, then ``kind``."""

    exact_max: int = 50_000
    kind: str = "ivf"  # "ivf" | "hnsw"
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    gpu: bool = False  # search on GPU copies when faiss has GPU support and a GPU is present


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
    """A table frozen for publication: its kind, size and the two file contents."""

    kind: str
    size: int
    index_bytes: bytes
    ids_bytes: bytes


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


class Table:
    """One FAISS index plus label → (sample id, experience). Labels are never reused.

    Flat and HNSW indexes sit in an ``IndexIDMap2``; IVF takes ids natively.
    HNSW cannot delete in place, so removed labels become tombstones filtered
    by an ``IDSelector`` until the index is rebuilt.
    """

    def __init__(self, kind: str, index: faiss.Index) -> None:
        self.kind = kind
        self.index = index
        self.ids: list[str | None] = []
        self.exps = np.zeros(1024, dtype=np.int64)  # by label, grown by doubling
        self.label_of: dict[str, int] = {}
        self.dead: set[int] = set()
        self._selector: tuple | None = None
        self._gpu_index: faiss.Index | None = None

    @classmethod
    def create(cls, kind: str, dim: int, vectors: np.ndarray, options: IndexOptions) -> Table:
        """An empty table of ``kind``; IVF is trained on ``vectors`` (normalized)."""
        return cls(kind, _new_faiss(kind, dim, vectors, options))

    @property
    def size(self) -> int:
        return len(self.label_of)

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
        self.index.add_with_ids(x[keep], labels)
        if len(self.exps) < start + len(keep):
            grown = np.zeros(max(2 * len(self.exps), start + len(keep)), dtype=np.int64)
            grown[:start] = self.exps[:start]
            self.exps = grown
        self.exps[labels] = np.asarray(experiences, dtype=np.int64)[keep]
        for label, i in zip(labels.tolist(), keep, strict=True):
            self.ids.append(sample_ids[i])
            self.label_of[sample_ids[i]] = label
        self._gpu_index = None
        return len(keep)

    def remove(self, sample_ids: list[str]) -> int:
        labels = [self.label_of.pop(s) for s in set(sample_ids) if s in self.label_of]
        for label in labels:
            self.ids[label] = None
        if labels:
            if self.kind == "hnsw":
                self.dead.update(labels)
                self._selector = None
            else:
                self.index.remove_ids(np.array(labels, dtype=np.int64))
            self._gpu_index = None
        return len(labels)

    def live_vectors(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(vectors, sample ids, experiences) still indexed; flat and HNSW tables only."""
        inner = faiss.downcast_index(self.index.index)
        vectors = inner.reconstruct_n(0, inner.ntotal)
        labels = faiss.vector_to_array(self.index.id_map)
        live = np.array([self.ids[label] is not None for label in labels], dtype=bool)
        labels = labels[live]
        return vectors[live], [self.ids[label] for label in labels], self.exps[labels]

    def _params(self, k: int, options: IndexOptions) -> faiss.SearchParameters | None:
        if self.kind != "hnsw":
            return None
        params = faiss.SearchParametersHNSW(efSearch=max(options.ef_search, k))
        if self.dead:
            if self._selector is None:
                batch = faiss.IDSelectorBatch(np.fromiter(self.dead, dtype=np.int64))
                self._selector = (batch, faiss.IDSelectorNot(batch))
            params.sel = self._selector[1]
        return params

    def _searchable(self, options: IndexOptions) -> faiss.Index:
        if not options.gpu or self.kind == "hnsw" or not _gpu_available():
            return self.index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu_index

    def search(self, q: np.ndarray, k: int, options: IndexOptions) -> SearchResult:
        """k nearest neighbours of normalized queries ``q``, padded when fewer exist."""
        scores, ids, exps = result = SearchResult.empty(len(q), k)
        kk = min(k, self.index.ntotal)
        if kk == 0 or len(q) == 0:
            return result
        dist, labels = self._searchable(options).search(q, kk, params=self._params(kk, options))
        valid = labels >= 0
        scores[:, :kk] = np.where(valid, dist, -np.inf)
        exps[:, :kk] = np.where(valid, self.exps[np.maximum(labels, 0)], -1)
        for row, out in zip(labels.tolist(), ids, strict=True):
            out[:kk] = [self.ids[label] if label >= 0 else "" for label in row]
        return result

    def snapshot(self) -> TableSnapshot:
        """The table's ``index.faiss`` and ``ids.json`` contents."""
        live = sorted(self.label_of.values())
        ids = {
            "kind": self.kind,
            "next_label": len(self.ids),
            "labels": live,
            "sample_ids": [self.ids[label] for label in live],
            "experiences": self.exps[live].tolist(),
            "dead": sorted(self.dead),
        }
        return TableSnapshot(
            self.kind,
            self.size,
            faiss.serialize_index(self.index).tobytes(),
            json.dumps(ids).encode(),
        )

    @classmethod
    def deserialize(cls, index_bytes: bytes, ids_bytes: bytes) -> Table:
        meta = json.loads(ids_bytes)
        table = cls(meta["kind"], faiss.deserialize_index(np.frombuffer(index_bytes, np.uint8)))
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
    ) -> None:
        if kind not in ("ivf", "hnsw"):
            raise ValueError(f"kind must be 'ivf' or 'hnsw', not {kind!r}")
        self.dir = Path(root) / "index"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.options = IndexOptions(exact_max, kind, nprobe, hnsw_m, ef_search, gpu)
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
        """Kind of the live index: "flat", "ivf" or "hnsw" (None before the first add/load)."""
        with self._lock:
            return self._table.kind if self._table else None

    def _kind_for(self, n: int) -> str:
        return "flat" if n <= self.options.exact_max else self.options.kind

    def _table_from(self, x: np.ndarray, sample_ids: list[str], experiences: list[int]) -> Table:
        table = Table.create(self._kind_for(len(x)), self.dim, x, self.options)
        table.add(x, sample_ids, experiences)
        return table

    def add(
        self, version: int, vectors: np.ndarray, sample_ids: list[str], experiences: list[int]
    ) -> int:
        """Add to the live index of ``version`` (the first add creates it). Returns vectors added.

        Crossing ``exact_max`` converts the live flat index to IVF/HNSW (once, under the lock).
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
            if self._table.kind == "flat" and self._table.size > self.options.exact_max:
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
            return self._table.search(q, k, self.options)

    def remove(self, sample_ids: list[str]) -> int:
        """Drop samples (e.g. evicted by the store) from the live index. Returns vectors removed."""
        with self._lock:
            if self._table is None:
                return 0
            removed = self._table.remove(sample_ids)
            table = self._table
            if table.kind == "hnsw" and len(table.dead) > HNSW_REBUILD_DEAD * table.index.ntotal:
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
            self._publish(built.version, built.table.snapshot())
            with self._lock:
                self._version, self._table = built.version, built.table
            self._prune()

    def save(self) -> None:
        """Publish the live index as a new generation of its version (crash-safe)."""
        with self._publish_lock:
            with self._lock:
                if self._table is None:
                    return
                version, snapshot = self._version, self._table.snapshot()
            self._publish(version, snapshot)
            self._prune()

    def _dirs(self) -> list[tuple[int, int, Path]]:
        """Published directories as (version, generation, path), oldest first."""
        found = []
        for path in self.dir.iterdir():
            parsed = _parse_dir(path.name)
            if parsed and path.is_dir():
                found.append((*parsed, path))
        return sorted(found)

    def _publish(self, version: int, snapshot: TableSnapshot) -> None:
        generation = 1 + max((g for v, g, _ in self._dirs() if v == version), default=0)
        name = f"v{version:06d}.g{generation:06d}"
        tmp = self.dir / f".tmp-{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        manifest = {
            "version": version,
            "generation": generation,
            "dim": self.dim,
            "kind": snapshot.kind,
            "size": snapshot.size,
            "sha256": {
                INDEX_FILE: _sha256(snapshot.index_bytes),
                IDS_FILE: _sha256(snapshot.ids_bytes),
            },
        }
        for fname, data in (
            (INDEX_FILE, snapshot.index_bytes),
            (IDS_FILE, snapshot.ids_bytes),
            (MANIFEST_FILE, json.dumps(manifest).encode()),
        ):
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, self.dir / name)
        fsync_dir(self.dir)
        write_atomic(self.dir / CURRENT_FILE, name.encode())

    def _prune(self) -> None:
        """Keep CURRENT and the newest directory of the version before it; delete the rest."""
        current = (self.dir / CURRENT_FILE).read_text().strip()
        version = _parse_dir(current)[0]
        older = [path for v, _, path in self._dirs() if v < version]
        keep = {current, older[-1].name if older else current}
        for path in self.dir.iterdir():
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _read_valid(self, path: Path) -> tuple[dict, Table] | None:
        """The manifest and table of a published directory, or None if it is torn."""
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_bytes())
            index_bytes = (path / INDEX_FILE).read_bytes()
            ids_bytes = (path / IDS_FILE).read_bytes()
        except (OSError, ValueError):
            return None
        sums = manifest.get("sha256", {})
        if (
            manifest.get("dim") != self.dim
            or sums.get(INDEX_FILE) != _sha256(index_bytes)
            or sums.get(IDS_FILE) != _sha256(ids_bytes)
        ):
            return None
        return manifest, Table.deserialize(index_bytes, ids_bytes)

    def load(self) -> int | None:
        """Make the CURRENT directory live (else the newest valid one); returns its version.

        Torn or mismatched directories (bad manifest, sha256 or dim) are ignored.
        """
        with self._publish_lock:
            current_file = self.dir / CURRENT_FILE
            current = current_file.read_text().strip() if current_file.exists() else ""
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
