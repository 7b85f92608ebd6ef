"""Atomic, verifiable checkpoints under `<state>/checkpoints/`.

A checkpoint is a folder of files plus `manifest.json` holding the sha256 of every
file. It is written into a temporary folder, each file fsynced, then renamed into
place, and only then is `LATEST` swapped. Loading verifies the manifest; a torn or
tampered checkpoint is skipped for the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from replay.atomic import fsync_path, write_atomic

log = structlog.get_logger()

MANIFEST = "manifest.json"
FileWriter = Callable[[Path], None]


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder and its manifest."""

    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(root: Path, name: str, writers: dict[str, FileWriter], manifest: dict) -> Checkpoint:
    """Write `writers` (file name -> function writing that file) as checkpoint `name`.

    Files may be nested (`replay/buffer.safetensors`). The manifest gets `files`
    (relative path -> sha256) and `created_at`; `LATEST` points at the new folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for rel, write in writers.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            files[str(path.relative_to(tmp))] = sha256_file(path)
        full = {**manifest, "name": name, "created_at": time.time(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))
        with open(tmp / MANIFEST, "rb+") as fh:
            os.fsync(fh.fileno())
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(root / "LATEST", name.encode())
    return Checkpoint(final, full)


def verify(path: Path) -> Checkpoint | None:
    """The checkpoint at `path` if its manifest and every listed file check out, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for rel, digest in manifest["files"].items():
            if sha256_file(path / rel) != digest:
                log.warning("checkpoint_corrupt", checkpoint=path.name, file=rel)
                return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("checkpoint_unreadable", checkpoint=path.name, error=str(exc))
        return None
    return Checkpoint(path, manifest)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (by name: names sort in training order)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies: `LATEST` first, then the others newest first."""
    candidates = list_checkpoints(root)[::-1]
    latest = root / "LATEST"
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        checkpoint = verify(path)
        if checkpoint is not None:
            return checkpoint
        log.warning("checkpoint_skipped", checkpoint=path.name)
    return None


def clean_temporaries(root: Path) -> None:
    """Remove temporary folders left by a crash during a write."""
    if root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
