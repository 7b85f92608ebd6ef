"""Images inside a tar archive, read sequentially; a first-level folder name is the label."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from streamer.sources import IMAGE_EXTENSIONS, Item


def tarball(path: Path) -> Iterator[Item]:
    """Image members of the archive at `path` (any compression) in archive order.

    Links and other non-regular members are skipped; nothing is extracted to disk.
    """
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            name = PurePosixPath(member.name.removeprefix("./"))
            ext = name.suffix[1:].lower()
            if not member.isfile() or ext not in IMAGE_EXTENSIONS:
                continue
            data = archive.extractfile(member)
            if data is None:
                continue
            label = name.parts[0] if len(name.parts) > 1 else None
            yield Item(data.read(), ext, label, name.with_suffix("").as_posix())
