"""Atomic, verifiable checkpoints under `<state>/checkpoints/`.

A checkpoint is a folder of files plus `manifest.json` holding the sha256 of every
file. It is published with `safefiles.publish`: written into a temporary folder, each
file fsynced, then renamed into place, and only then is `LATEST` swapped. Loading
verifies the manifest; a torn or tampered checkpoint is skipped for the previous good one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from safefiles.publish import (
    MANIFEST,
    clean_staging,
    first_mismatch,
    flip_pointer,
    publish_dir,
    read_pointer,
    staging_dir,
    sync_tree,
)

log = structlog.get_logger()

LATEST = "LATEST"
FileWriter = Callable[[Path], None]


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder and its manifest."""

    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name


def write_checkpoint(root: Path, name: str, writers: dict[str, FileWriter], manifest: dict) -> Checkpoint:
    """Write `writers` (file name -> function writing that file) as checkpoint `name`.

    Files may be nested (`replay/buffer.safetensors`). The manifest gets `files`
    (relative path -> sha256) and `created_at`; `LATEST` points at the new folder.
    """
    final = root / name
    with staging_dir(root, name) as tmp:
        for rel, write in writers.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
        full = {**manifest, "name": name, "created_at": time.time(), "files": sync_tree(tmp)}
        publish_dir(tmp, final, json.dumps(full, indent=2, sort_keys=True).encode(), replace=True)
    flip_pointer(root / LATEST, name)
    return Checkpoint(final, full)


def verify(path: Path) -> Checkpoint | None:
    """The checkpoint at `path` if its manifest and every listed file check out, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        torn = first_mismatch(path, manifest["files"])
        if torn is not None:
            log.warning("checkpoint_corrupt", checkpoint=path.name, file=torn)
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
    latest = read_pointer(root / LATEST)
    if latest:
        named = root / latest
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
    clean_staging(root)
