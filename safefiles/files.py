"""One file on disk, crash-safe: fsynced writes, atomic replacement, exclusive create, sha256."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
from pathlib import Path

CHUNK = 1 << 20  # bytes hashed per read: a big file passes through the page cache, not the heap


def fsync_path(path: Path) -> None:
    """Flush ``path`` to disk: a file's data, or a directory's entries (a rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (no rename: for files inside a staging directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file.

    Written to a temporary file in the same directory, fsynced, renamed over ``path``, and the
    directory fsynced so the rename itself survives a power loss.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_exclusive(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` through a file nobody could have planted.

    The temporary file gets an unpredictable name and is created with
    O_CREAT|O_EXCL|O_NOFOLLOW and ``mode`` (a planted file or symlink is never written
    through), fsynced, then renamed over ``path`` (a symlink there is replaced, not followed).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks into one reused buffer."""
    digest, chunk = hashlib.sha256(), bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            digest.update(memoryview(chunk)[:n])
    return digest.hexdigest()


def file_matches(path: Path, sha256: str, size: int | None = None) -> bool:
    """Whether ``path`` exists, has ``size`` bytes (when given; checked before hashing) and
    hashes to ``sha256``."""
    try:
        if size is not None and Path(path).stat().st_size != size:
            return False
        return sha256_file(path) == sha256
    except OSError:
        return False
