"""Images under a directory, recursively; a first-level folder name is the label."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from streamer.sources import IMAGE_EXTENSIONS, Item


def directory(path: Path) -> Iterator[Item]:
    """Image files under `path` in sorted order (ImageFolder layout: root/LABEL/file.jpg).

    A file directly in `path` has no label; the key is the relative path without suffix.
    """
    root = Path(path)
    files = (p for p in root.rglob("*") if p.suffix[1:].lower() in IMAGE_EXTENSIONS)
    for file in sorted(files):
        if not file.is_file():
            continue
        relative = file.relative_to(root)
        label = relative.parts[0] if len(relative.parts) > 1 else None
        yield Item(
            file.read_bytes(), file.suffix[1:].lower(), label, relative.with_suffix("").as_posix()
        )
