"""The held-out split of the built-in textures and photos: sources a stream never shows.

Snapshot targets (benchmarks/snapshot.py) must come from pictures the daemon never
streamed, or retrieval finds crops of the very same picture. So each class's sources
(patterns, photos) are grouped, a group being one picture and its near copies (the
same pixels, a recolour or rescale: grey 32x32 thumbnails correlated at NEAR_COPY or
more; stereo pairs and before/after versions named in SAME_PICTURE), and whole groups are
held out: every HOLDOUT_EVERY-th group of a class from the second on. `textures` and
`photos` stream the rest; `textures-heldout` and `photos-heldout` crop the held-out ones.

Example:
    >>> split = split_sources({"stone": [("a", a), ("b", b), ("c", c)]}, heldout=True)
    >>> [len(v) for v in split.values()]   # group 1 of 3 ("b", unless b copies a or c)
    [1]
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from PIL import Image

HOLDOUT_EVERY = 4
NEAR_COPY = 0.9  # thumbnail correlation at which two sources count as one picture
SAME_PICTURE = (
    ("aloel", "aloer"), ("basketball1", "basketball2"), ("rubberwhale1", "rubberwhale2"),
    ("ela_modified", "ela_original"), ("opencv-logo", "opencv-logo-white"), ("left", "right"),
    ("box", "box_in_scene"), ("leuvena", "leuvenb"), ("aero1", "aero3"), ("graf1", "graf3"),
    ("blender_suzanne1", "blender_suzanne2"), ("text_defocus", "text_motion"),
    ("imagetextn", "imagetextr"), ("pic1", "pic2", "pic3", "pic4", "pic5", "pic6"),
)  # fmt: skip
STEREO = re.compile(r"^(?:left|right)(\d+)$")  # OpenCV's calibration pairs: left01 and right01 are one shot

Source = tuple[str, np.ndarray]  # (name, HxWx3 uint8 pixels)


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    """Grey 32x32, zero mean, unit norm: a dot product of two is their correlation."""
    grey = np.asarray(Image.fromarray(pixels).convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float64)
    grey = grey.ravel() - grey.mean()
    norm = np.linalg.norm(grey)
    return grey / norm if norm else grey


def _picture_key(name: str) -> str:
    """Names of one picture share a key: a SAME_PICTURE group's first name, a stereo pair's number."""
    stereo = STEREO.match(name)
    if stereo:
        return f"stereo-{stereo.group(1)}"
    return next((group[0] for group in SAME_PICTURE if name in group), name)


def picture_groups(sources: list[Source]) -> list[list[int]]:
    """Indices of `sources` grouped by picture (union of same key and near copy), by first index."""
    parent = list(range(len(sources)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    thumbs = np.stack([_thumbnail(pixels) for _, pixels in sources]) if sources else np.zeros((0, 1024))
    close = thumbs @ thumbs.T >= NEAR_COPY  # (N, N)
    keys = [_picture_key(name) for name, _ in sources]
    for i in range(len(sources)):
        for j in range(i):
            if close[i, j] or keys[i] == keys[j]:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(sources)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def split_sources(classes: dict[str, list[Source]], heldout: bool) -> dict[str, list[np.ndarray]]:
    """Each class's streamed pixels (`heldout` False) or held-out ones: whole picture groups, group
    g held out when g % HOLDOUT_EVERY == 1, so a class of two or more pictures has both sides."""
    split = {}
    for label, sources in classes.items():
        groups = picture_groups(sources)
        chosen = [i for g, members in enumerate(groups) if (g % HOLDOUT_EVERY == 1) == heldout for i in members]
        split[label] = [sources[i][1] for i in sorted(chosen)]
    return split


def distinct(sources: list[Source]) -> list[Source]:
    """`sources` without exact pixel copies of an earlier one (a copy on both sides of the split leaks)."""
    seen: set[tuple[tuple[int, ...], bytes]] = set()
    kept = []
    for name, pixels in sources:
        key = (pixels.shape, hashlib.sha256(pixels.tobytes()).digest())
        if key not in seen:
            seen.add(key)
            kept.append((name, pixels))
    return kept
