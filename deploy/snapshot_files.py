"""Exported snapshots on disk: where they live, and how one is written, found, read and listed.

A snapshot is one folder `state_dir/snapshots/<name>/` (the folder of folders is mode 0700)
holding `model.safetensors` (the backbone alone, `learners.snapshot.save_backbone`) and
`manifest.json` (the engine's fields + `files` (`model.safetensors` -> sha256) and
`created_at`). It is published whole with `safefiles.publish`: built in a `.tmp-*` staging
folder beside its final place, fsynced, renamed into place. The name is the handle (no
pointer file) and a published snapshot is never replaced.

`SnapshotShelf` is that folder of snapshots and nothing else; what goes into a snapshot is
decided by `deploy.snapshots.SnapshotEngine`. Stdlib only (the status page lists snapshots
through it); failures are `deploy.snapshot_errors` kinds.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.snapshot_errors import BadRequest, Conflict, NotFound
from safefiles.publish import MANIFEST, clean_staging, publish_dir, staging_dir

SNAPSHOTS_DIR = "snapshots"  # under the state dir
MODEL_FILE = "model.safetensors"  # learners.snapshot.MODEL_FILE (not imported: no torch here)
SNAPSHOT_FILES = (MODEL_FILE, MANIFEST)  # the files a snapshot serves
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """A snapshot name safe as one path component; BadRequest otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise BadRequest(f"bad snapshot name {str(name)[:80]!r}: use 1-64 of A-Z a-z 0-9 . _ - "
                         "starting with a letter or digit")
    return name


def default_name() -> str:
    """`snap-YYYYmmdd-HHMMSS-<6 hex>` (UTC): the name of a snapshot asked for without one."""
    return f"snap-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class SnapshotShelf:
    """The snapshot folders under `root` (a state dir's `snapshots/`).

    Making one touches nothing on disk (a reader such as the status page may list a folder
    that does not exist yet); `prepare` creates the folder and removes what a crash left.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> SnapshotShelf:
        """The shelf of a daemon's state dir (`state_dir/snapshots/`)."""
        return cls(Path(state_dir) / SNAPSHOTS_DIR)

    def prepare(self) -> SnapshotShelf:
        """Create the folder (owner-only) if needed and remove staging folders a crash left."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        clean_staging(self.root)
        return self

    def exists(self, name: str) -> bool:
        """Whether snapshot `name` is published (BadRequest for a bad name)."""
        return (self.root / check_name(name)).exists()

    def describe(self, name: str) -> dict[str, Any]:
        """The manifest of snapshot `name`; BadRequest for a bad name, NotFound without one."""
        path = self.root / check_name(name) / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no snapshot {name!r}") from None

    def file_path(self, name: str, filename: str) -> Path:
        """A downloadable file of snapshot `name` (one of SNAPSHOT_FILES); NotFound otherwise."""
        path = self.root / check_name(name) / filename
        if filename not in SNAPSHOT_FILES or not path.is_file():
            raise NotFound(f"no file {filename[:80]!r} in snapshot {name!r}")
        return path

    def publish(self, name: str, manifest: dict[str, Any], write_model: Callable[[Path], str]) -> dict[str, Any]:
        """Publish snapshot `name`: `write_model(folder)` writes `model.safetensors` into the
        staging folder and returns its sha256; `manifest` gains `files` and `created_at` and is
        written beside it, then the folder is renamed into place. Returns the written manifest;
        Conflict if the name was taken meanwhile (nothing is left behind)."""
        name = check_name(name)
        with staging_dir(self.root, name, mode=0o700) as tmp:
            digest = write_model(tmp)
            manifest = {**manifest, "files": {MODEL_FILE: digest}, "created_at": time.time()}
            try:
                publish_dir(tmp, self.root / name, json.dumps(manifest, indent=2, sort_keys=True).encode())
            except FileExistsError:
                raise Conflict(f"snapshot {name!r} already exists") from None
        return manifest

    def newest(self, most: int) -> tuple[list[dict[str, Any]], int]:
        """The manifests of the `most` newest snapshot folders (by modification time), newest
        `created_at` first, each with its `name` (the folder's when the manifest has none), and
        how many snapshot folders there are. Staging folders are not snapshots; a folder whose
        manifest cannot be read is counted but not listed; no folder at all is ([], 0)."""
        try:
            folders = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except OSError:
            return [], 0
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        manifests = []
        for folder in folders[:most]:
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(manifest, dict):
                manifests.append(manifest | {"name": manifest.get("name") or folder.name})
        manifests.sort(key=lambda m: m.get("created_at") or 0, reverse=True)
        return manifests, len(folders)
