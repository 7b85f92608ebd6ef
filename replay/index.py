"""Versioned FAISS index of stored-sample embeddings, one per encoder version.

Embeddings from two encoder versions are not comparable, so each version has
its own index: a new one is built to the side (``build``) and published with
``swap`` while searches keep using the old one. On disk, under
``root/index/``, every publication is an immutable directory
``v{version:06d}.g{generation:06d}/`` holding ``index.faiss`` (or, for a
sharded index, one ``shard-NNN.faiss`` per shard; for an on-disk IVF index, one
``*.ivfdata`` list file per shard too), ``ids.json`` (FAISS label → sample id,
experience) and ``manifest.json`` (sha256 and size of every other file); it is
published with ``safefiles.publish`` (staged, fsynced, renamed into place), then
``CURRENT`` is flipped. ``save`` publishes a new generation of the live version the
same way, so a crash never leaves a torn index live.

Three layers, one module each: ``replay/index_lists.py`` (on-disk IVF list files),
``replay/index_table.py`` (the sharded table with tombstones and its search) and this
module (the live version, its publications and their verification). ``IndexOptions``
(``replay/index_options.py``) says how tables are built.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from replay.index_lists import LISTS_SUFFIX
from replay.index_options import IndexOptions
from replay.index_table import SearchResult, Table, TableFiles, normalized
from safefiles.files import file_matches, fsync_path, write_synced
from safefiles.publish import MANIFEST as MANIFEST_FILE
from safefiles.publish import flip_pointer, publish_dir, read_pointer, staging_dir

CURRENT_FILE = "CURRENT"
HNSW_REBUILD_DEAD = 0.25  # rebuild an HNSW index once this fraction of it is tombstones


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

    def __init__(self, root: Path, dim: int, options: IndexOptions | None = None) -> None:
        self.dir = Path(root) / "index"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.options = options or IndexOptions()
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

    def missing(self, sample_ids: list[str]) -> list[str]:
        """The ids of ``sample_ids`` not in the live index, in their order."""
        with self._lock:
            indexed = self._table.label_of if self._table else {}
            return [sid for sid in sample_ids if sid not in indexed]

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

    def hand_over(self, filed: dict[str, int]) -> int:
        """File live samples under other experiences (sample id -> experience; routing follows).
        Returns how many were indexed."""
        with self._lock:
            return self._table.hand_over(filed) if self._table is not None else 0

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
                self._commit(staging, built.version, built.table.publish(staging))
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
                    version, written = self._version, self._table.publish(staging)
                self._commit(staging, version, written)
            self._prune()

    def _dirs(self) -> list[tuple[int, int, Path]]:
        """Published directories as (version, generation, path), oldest first."""
        found = []
        for path in self.dir.iterdir():
            parsed = _parse_dir(path.name)
            if parsed and path.is_dir():
                found.append((*parsed, path))
        return sorted(found)

    def _commit(self, staging: Path, version: int, written: TableFiles) -> None:
        """Write ``written``'s files and a manifest (sha256 and size of every file) into
        ``staging``, fsync all of it, publish it as the next generation of ``version`` and flip
        CURRENT to it (``safefiles.publish``)."""
        for fname, data in written.files.items():
            write_synced(staging / fname, data)
        for fname in written.lists:  # written by Table.publish: only made durable here
            fsync_path(staging / fname)
        generation = 1 + max((g for v, g, _ in self._dirs() if v == version), default=0)
        name = f"v{version:06d}.g{generation:06d}"
        sums = {fname: _sha256(data) for fname, data in written.files.items()} | written.lists
        manifest = {
            "version": version,
            "generation": generation,
            "dim": self.dim,
            "kind": written.kind,
            "size": written.size,
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
