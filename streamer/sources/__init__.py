"""Image sources for `tailord produce`: a directory, a tar archive, or a built-in data set.

Every source yields `Item`s in a deterministic order; `open_source` parses the SOURCE
argument of the command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm"})


class Item(NamedTuple):
    """One image to publish: its encoded bytes, file extension, label and stable key."""

    encoded: bytes
    fmt_ext: str
    label: str | None
    key: str


class MissingDataError(RuntimeError):
    """A built-in data set whose system package is not installed."""


class Source(NamedTuple):
    """A parsed SOURCE: the default domain name and the items."""

    name: str
    items: Iterator[Item]


def open_source(spec: str) -> Source:
    """Parse SOURCE: `builtin:NAME`, a directory, or a tar archive (.tar, .tar.gz, .tgz)."""
    from streamer.sources.builtin import builtin
    from streamer.sources.directory import directory
    from streamer.sources.tarball import tarball

    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        return Source(name, builtin(name))
    path = Path(spec)
    if path.is_dir():
        return Source(path.resolve().name, directory(path))
    if path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz")):
        return Source(path.name.split(".")[0], tarball(path))
    raise ValueError(
        f"SOURCE {spec!r} is neither builtin:NAME, an existing directory, nor a .tar file"
    )
