"""Checkpoint retention: which checkpoint folders stay on disk as the daemon runs for weeks.

- Interval checkpoints (`exp-000003-step-…`) only matter until the next one: the newest
  two after the newest experience checkpoint are kept, older ones go.
- Experience checkpoints (`exp-000003`) are routing candidates for snapshots. With
  `TAILORD_KEEP_EXPERIENCES=N` the newest N stay, plus every one a snapshot chose, plus
  the `TAILORD_KEEP_DISTINCT` older ones whose stored samples are most unlike the kept
  ones (greedy farthest point on the experiences' mean embeddings in the index), so a
  rare domain seen long ago keeps its checkpoint. Unset keeps all. The sample store and the index keep the samples of a dropped
  experience (they still serve retrieval); routing only offers kept checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import structlog

from deploy.checkpoints import list_checkpoints
from deploy.snapshot_files import SNAPSHOTS_DIR

log = structlog.get_logger()
KEEP_INTERVAL = 2


def is_experience_checkpoint(path: Path) -> bool:
    return "-step-" not in path.name


def chosen_by_snapshots(state_dir: Path) -> set[int]:
    """Experiences that a stored snapshot was built from (never dropped)."""
    chosen = set()
    for manifest in (state_dir / SNAPSHOTS_DIR).glob("*/manifest.json"):  # staging folders too
        try:
            experience = json.loads(manifest.read_text()).get("chosen_experience")
        except (OSError, ValueError):
            continue
        if isinstance(experience, int):
            chosen.add(experience)
    return chosen


def experience_number(path: Path) -> int:
    return int(path.name.removeprefix("exp-"))


def most_distinct(candidates: list[int], kept: list[int], centroids: dict[int, np.ndarray],
                  count: int) -> set[int]:
    """Up to `count` candidates, each farthest (cosine) from the kept ones and those chosen before."""
    anchors = [centroids[k] for k in kept if k in centroids]
    pool = [c for c in candidates if c in centroids]
    chosen: set[int] = set()
    while pool and len(chosen) < count:
        best = max(pool, key=lambda c: min((1.0 - float(centroids[c] @ a) for a in anchors), default=2.0))
        chosen.add(best)
        anchors.append(centroids[best])
        pool.remove(best)
    return chosen


def prune_checkpoints(state_dir: Path, keep_experiences: int | None, current: str, keep_distinct: int = 0,
                      centroids: Callable[[], dict[int, np.ndarray]] | None = None) -> list[str]:
    """Delete checkpoints the policy no longer needs; never `current` (the one just written).

    `centroids` (experience -> mean embedding of its stored samples) is only called when
    older experience checkpoints are about to be dropped.
    """
    root = state_dir / "checkpoints"
    folders = list_checkpoints(root)
    experiences = [p for p in folders if is_experience_checkpoint(p)]
    newest_experience = experiences[-1].name if experiences else ""
    intervals = [p for p in folders if not is_experience_checkpoint(p)]
    drop = [p for p in intervals if p.name < newest_experience]
    drop += [p for p in intervals if p.name > newest_experience][:-KEEP_INTERVAL]
    if keep_experiences is not None and len(experiences) > keep_experiences:
        older = [experience_number(p) for p in experiences[:-keep_experiences]]
        kept = [experience_number(p) for p in experiences[-keep_experiences:]]
        protected = chosen_by_snapshots(state_dir)
        if keep_distinct and centroids is not None:
            candidates = [e for e in older if e not in protected]
            protected |= most_distinct(candidates, kept + sorted(protected), centroids(), keep_distinct)
        drop += [p for p in experiences[:-keep_experiences] if experience_number(p) not in protected]
    removed = []
    for path in drop:
        if path.name == current:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        log.info("checkpoints_pruned", removed=removed)
    return removed


def directory_bytes(path: Path) -> int:
    """Disk use of a folder tree (apparent size of its files)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
