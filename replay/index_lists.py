"""On-disk IVF inverted lists: write them compact, map them read-only, build shards on them.

With ``IndexOptions.ondisk`` an IVF shard keeps its inverted lists out of RAM: each publication
holds one compact ``*.ivfdata`` list file per shard, written here list after list (codes, then
ids) from the published lists plus the in-RAM additions minus the tombstones, and the shard
serves its lists memory-mapped read-only from it (FAISS ``OnDiskInvertedLists``). Published
list files are never written again (FAISS corrupts on-disk lists it adds to or shrinks: faiss
issue #3498).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np

LISTS_SUFFIX = ".ivfdata"  # inverted lists of an on-disk IVF shard, named after its .faiss file
# Published lists are read for their metadata only, then mapped read-only from their own file.
ONDISK_READ_FLAGS = faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
ID_BYTES = 8  # an inverted list entry is its code followed, list-wise, by an int64 id


def lists_file(shard_file: str) -> str:
    """The list file of an on-disk shard: ``shard-000.faiss`` → ``shard-000.ivfdata``."""
    return Path(shard_file).stem + LISTS_SUFFIX


def ivf_sibling(ivf: faiss.IndexIVF) -> faiss.IndexIVFFlat:
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


def write_lists(
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


def ondisk_shard(like: faiss.IndexIVF, sizes: np.ndarray, lists_name: str) -> faiss.IndexIVFFlat:
    """An IVF with ``like``'s quantizer whose lists are the compact file ``lists_name`` holding
    ``sizes`` entries per list (not mapped yet: it serializes to metadata only)."""
    shard = ivf_sibling(like)
    lists = faiss.OnDiskInvertedLists(shard.nlist, shard.code_size, lists_name)
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    shard.ntotal = int(sizes.sum())
    lists.totsize = shard.ntotal * (shard.code_size + ID_BYTES)
    shard.replace_invlists(lists, True)
    lists.this.disown()  # owned by the shard now
    return shard


def map_lists(shard: faiss.IndexIVF, path: Path) -> faiss.IndexIVF:
    """Serve ``shard``'s on-disk lists from ``path``, memory-mapped read-only.

    Pages are read on demand and stay reclaimable page cache; nothing is copied into the heap,
    and a write to the file is impossible. No prefetch threads (FAISS starts up to 32 per search).
    """
    lists = faiss.downcast_InvertedLists(shard.invlists)
    lists.filename, lists.read_only, lists.prefetch_nthread = str(path), True, 0
    if lists.totsize:  # mmap refuses an empty file
        lists.do_mmap()
    return shard


def deserialize_index(data: bytes, flags: int = 0) -> faiss.Index:
    """A FAISS index from its serialized bytes (``flags``: FAISS IO flags)."""
    return faiss.deserialize_index(np.frombuffer(data, np.uint8), flags)
