"""Directories published whole: staged to the side, fsynced, renamed into place, then pointed at.

A publication is a directory of files plus a manifest listing their sha256. It is built in a
staging directory (``.tmp-*`` beside its final place), every file fsynced, the manifest written,
the staging directory renamed to its final name and the parent fsynced; only then does a
pointer file (``LATEST``, ``CURRENT``) flip to it. A crash at any point leaves the previous
publication and pointer as they were, plus at most a ``.tmp-*`` leftover (``clean_staging``).
Readers check a publication with ``first_mismatch`` and fall back to an older one.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from safefiles.files import file_matches, fsync_path, sha256_file, write_atomic, write_synced

MANIFEST = "manifest.json"
STAGING_PREFIX = ".tmp-"


@contextmanager
def staging_dir(parent: Path, tag: str, mode: int = 0o777) -> Iterator[Path]:
    """A new empty directory ``parent/.tmp-<tag>-<random>`` to build a publication in.

    Removed with everything in it if the block raises; left alone otherwise (``publish_dir``
    renamed it away, or a caller keeps it to prune later).
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{STAGING_PREFIX}{tag}-{secrets.token_hex(4)}"
    path.mkdir(mode=mode)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def clean_staging(parent: Path) -> None:
    """Remove staging directories a crash left under ``parent``."""
    if parent.is_dir():
        for leftover in parent.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def sync_tree(directory: Path) -> dict[str, str]:
    """fsync every file under ``directory``; their sha256 by relative path (sorted, '/'-separated)."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fsync_path(path)
        digests[path.relative_to(directory).as_posix()] = sha256_file(path)
    return digests


def publish_dir(staging: Path, final: Path, manifest: bytes, *, replace: bool = False,
                manifest_name: str = MANIFEST) -> None:
    """Write ``manifest`` into ``staging`` (fsynced), then rename ``staging`` to ``final``, durably.

    The files already in ``staging`` must be fsynced (``sync_tree`` or ``write_synced``). With
    ``replace`` an existing ``final`` is deleted first; without it an existing ``final`` raises
    ``FileExistsError`` and ``staging`` stays where it is.
    """
    write_synced(staging / manifest_name, manifest)
    fsync_path(staging)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        os.rename(staging, final)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, f"{final} already exists") from exc
        raise
    fsync_path(final.parent)


def flip_pointer(pointer: Path, name: str) -> None:
    """Point ``pointer`` (a small text file) at the publication ``name``, atomically."""
    write_atomic(pointer, name.encode())


def read_pointer(pointer: Path) -> str | None:
    """The publication name ``pointer`` holds, None when there is no pointer yet."""
    try:
        return pointer.read_text().strip()
    except FileNotFoundError:
        return None


def first_mismatch(directory: Path, digests: Mapping[str, str],
                   sizes: Mapping[str, int] | None = None) -> str | None:
    """The first file of ``digests`` (relative path -> sha256) missing from ``directory`` or
    differing from it (size first, when ``sizes`` lists it), None when every one matches."""
    for rel, digest in digests.items():
        size = sizes.get(rel) if sizes is not None else None
        if not file_matches(directory / rel, digest, size):
            return rel
    return None
