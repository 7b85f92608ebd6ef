"""Turn one untrusted Kafka record value into decoded, resized RGB images.

A value is one encoded image or a tar batch of them (docs/design.md, "Wire format").
Everything about it is hostile until checked: the format is sniffed from magic bytes (never
from headers or names), sizes are bounded before anything is allocated, tar members are read
in memory (never extracted) and Pillow only ever sees the seven allowed formats (an animated
GIF is decoded as its first frame). Any failure raises `RejectedRecord` with one of
`REASONS`, so the caller can send the record to the DLQ and go on.

Pixel limits come in two tiers:
- `too_many_pixels`: width*height declared by the header is over `limits.max_pixels` (the
  operator's setting), checked before any pixel is decoded;
- `decompression_bomb`: a size over `BOMB_PIXELS`, a hard ceiling no setting can lift. Pillow
  keeps its own guard in a process-wide variable, so the first decode (not the import) sets
  `Image.MAX_IMAGE_PIXELS` to half of it, once and under a lock (decode threads would race):
  Pillow raises `DecompressionBombError` over twice that, in every check it makes (GIF
  frames, ...), with no warnings filter needed. Between half the ceiling and the ceiling
  Pillow only warns; such an image is over the default `max_pixels` and refused as
  `too_many_pixels` (or as `decompression_bomb` where the host turns warnings into errors).

Functions here keep no state between calls and are safe to call from several threads.
`decode_image` decodes one encoded image (a stored sample, a snapshot target);
`decode_record` a whole record, tar batches included.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
import torch
from PIL import Image

from streamer.limits import DecodeLimits
from streamer.records import DecodedImage, RejectedRecord

REASONS = (
    "empty",
    "too_large",
    "bad_header",
    "unknown_format",
    "corrupt_image",
    "too_many_pixels",
    "decompression_bomb",
    "corrupt_tar",
    "unsafe_tar",
    "tar_bomb",
    "empty_tar",
    "bad_member_json",
)
"""Every `RejectedRecord.reason` this module raises (stable: they are metric labels)."""

BOMB_PIXELS = 1 << 27
"""Hard ceiling on width*height (134M pixels, about 400 MB as RGB), whatever the limits say."""

MAX_HEADERS = 64
"""Most headers one record (or one tar member's KEY.json) may carry."""

MAX_PAX_BYTES = 512
"""Largest pax extended header in a tar batch (one block: room for a long or non-ASCII name)."""

_BAND_PIXELS = 1 << 16
"""Pixels converted at a time from 16/32-bit grey to 8 bits (bounds the temporary arrays)."""

# Pillow plugin name for each sniffed format: Image.open never tries any other plugin.
_PILLOW_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
    "ppm": "PPM",
    "gif": "GIF",
}

# Member suffixes that claim to be an image; their bytes are still sniffed.
_IMAGE_SUFFIXES = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "pnm", "gif"}
)

_pillow_lock = threading.Lock()
_pillow_ready = False


def _ready_pillow() -> None:
    """Register Pillow's plugins and set its bomb guard, once per process, before the first open.

    Plugins are registered now rather than lazily by several decode threads at once, and
    Pillow errors (not warns) above 2 * MAX_IMAGE_PIXELS == BOMB_PIXELS.
    """
    global _pillow_ready
    with _pillow_lock:
        if not _pillow_ready:
            Image.init()
            Image.MAX_IMAGE_PIXELS = BOMB_PIXELS // 2
            _pillow_ready = True


def sniff_format(data: bytes) -> str | None:
    """The format of `data` from its magic bytes: an image format, "tar", or None.

    Strong magics come first; "tar" (ustar at offset 257) goes before the two weak
    ones ("BM", "P6\\n"), which a tar's first member name could start with.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[257:262] == b"ustar":
        return "tar"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:1] == b"P" and data[1:2] in (b"2", b"3", b"5", b"6") and data[2:3].isspace():
        return "ppm"
    return None


def decode_record(
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    limits: DecodeLimits,
    size: int,
    *,
    defer_jpeg: bool = False,
) -> list[DecodedImage]:
    """Decode a record value into (3, size, size) uint8 RGB images with their headers.

    Checks run cheapest first: empty, too_large, bad_header, then the format. A tar batch
    yields one image per image member (any bad member rejects the whole record); a single
    image yields one. Raises `RejectedRecord` for anything that cannot be trained on.

    With `defer_jpeg`, a YCbCr or grey JPEG (alone or in a tar) passes every check up to its
    pixels and comes back with `image=None`, for a batched decoder to fill
    (`streamer.jpeg_batch`); should that decoder fail, decoding without it names the reason.
    """
    if not value:
        raise RejectedRecord("empty", "record has no value")
    if len(value) > limits.max_record_bytes:
        raise RejectedRecord(
            "too_large", f"{len(value)} bytes > max_record_bytes {limits.max_record_bytes}"
        )
    record_headers = _decode_headers(headers, limits)
    fmt = sniff_format(value)
    if fmt is None:
        raise RejectedRecord("unknown_format", f"magic bytes {value[:8]!r}")
    if fmt == "tar":
        return _decode_tar(value, record_headers, limits, size, defer_jpeg)
    image = _decode_image(value, fmt, limits, size, defer_jpeg)
    return [DecodedImage(image, value, fmt, None, record_headers)]


def decode_image(data: bytes, limits: DecodeLimits, size: int) -> torch.Tensor:
    """One encoded image (any allowed format, not a tar batch) as a (3, size, size) uint8 RGB
    tensor, under the same limits and checks as a record; `RejectedRecord` otherwise."""
    if sniff_format(data) == "tar":
        raise RejectedRecord("unknown_format", "a tar batch, not one image")
    [decoded] = decode_record(data, [], limits, size)
    return decoded.image


def _decode_headers(headers: list[tuple[str, bytes]], limits: DecodeLimits) -> dict[str, str]:
    """Record headers as a dict with lowercased keys; later duplicates win.

    A null header value (allowed by Kafka) reads as "".
    """
    if len(headers) > MAX_HEADERS:
        raise RejectedRecord("bad_header", f"{len(headers)} headers > {MAX_HEADERS}")
    decoded: dict[str, str] = {}
    for key, raw in headers:
        raw = raw or b""
        if len(key) > limits.max_header_bytes or len(raw) > limits.max_header_bytes:
            raise RejectedRecord(
                "bad_header", f"header {key[:64]!r} over {limits.max_header_bytes} bytes"
            )
        try:
            decoded[key.lower()] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RejectedRecord("bad_header", f"header {key[:64]!r} is not UTF-8") from None
    return decoded


def _decode_image(
    data: bytes, fmt: str, limits: DecodeLimits, size: int, defer_jpeg: bool = False
) -> torch.Tensor | None:
    """Decode one encoded image fully (no truncated images) into a (3, size, size) tensor,
    or, with `defer_jpeg`, check a plain JPEG's header only and return None.

    Pillow raises many exception types on hostile input (OSError, ValueError, SyntaxError,
    struct.error, ...), so anything it raises becomes `corrupt_image`.
    """
    if not _pillow_ready:
        _ready_pillow()
    try:
        with Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[fmt]]) as img:
            _check_pixels(img.size, limits)
            if defer_jpeg and fmt == "jpeg" and img.mode in ("RGB", "L"):
                return None
            if fmt == "jpeg":
                img.draft("RGB", (size, size))  # let libjpeg decode at 1/2..1/8 scale
            img.load()
            return _to_tensor(_resize_crop(_to_rgb(img), size))
    except RejectedRecord:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedRecord("decompression_bomb", str(exc)) from None
    except Image.UnidentifiedImageError:  # its message holds a memory address
        raise RejectedRecord("corrupt_image", f"{fmt}: Pillow cannot read the header") from None
    except Exception as exc:
        raise RejectedRecord("corrupt_image", f"{fmt}: {type(exc).__name__}: {exc}") from None


def _check_pixels(dims: tuple[int, int], limits: DecodeLimits) -> None:
    """Reject an empty, oversized or bomb-sized image from its declared dimensions."""
    width, height = dims
    pixels = width * height
    if pixels == 0:
        raise RejectedRecord("corrupt_image", f"empty image {width}x{height}")
    if pixels > BOMB_PIXELS:
        raise RejectedRecord("decompression_bomb", f"{width}x{height} > {BOMB_PIXELS} pixels")
    if pixels > limits.max_pixels:
        raise RejectedRecord(
            "too_many_pixels", f"{width}x{height} > max_pixels {limits.max_pixels}"
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode as 8-bit RGB; alpha is dropped, high bit depths are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_depth_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns on palette transparency straight to RGB
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey as 8-bit "L" (Pillow's own convert clips at 255).

    Integers are taken as 16-bit (PNG/TIFF/PPM deep greys) and rounded to x/257; floats are
    stretched min..max (NaN as the minimum). Band by band, so besides the 8-bit result only
    one band's temporaries are held, never a full-size copy of the deep pixels.
    """
    out = np.empty((img.height, img.width), np.uint8)
    if img.mode == "F":
        low = high = np.float64(np.nan)
        for _, band in _grey_bands(img):  # fmin/fmax skip NaN (all-NaN gives NaN), no warning
            low, high = np.fmin(low, np.fmin.reduce(band, None)), np.fmax(high, np.fmax.reduce(band, None))
        scale = 255.0 / max(float(np.nan_to_num(high - low)), 1e-12)
        for rows, band in _grey_bands(img):
            out[rows] = np.rint(np.nan_to_num(band - low) * scale)
    else:
        for rows, band in _grey_bands(img):  # round(x * 255 / 65535) == (2x + 257) // 514: no ties
            out[rows] = (2 * np.clip(band, 0, 65535).astype(np.uint32) + 257) // 514
    return Image.fromarray(out, mode="L")


def _grey_bands(img: Image.Image) -> Iterator[tuple[slice, np.ndarray]]:
    """(row slice, pixels) of `img` in bands of about `_BAND_PIXELS` pixels."""
    rows = max(1, _BAND_PIXELS // img.width)
    for top in range(0, img.height, rows):
        bottom = min(top + rows, img.height)
        yield slice(top, bottom), np.asarray(img.crop((0, top, img.width, bottom)))


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, then the centred size x size square, in one bilinear resize.

    Pillow's resize antialiases when it shrinks; `box` takes the centre square of the source.
    """
    width, height = img.size
    if width == height == size:
        return img
    left, top, side = centre_square(width, height)
    box = (left, top, left + side, top + side)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def centre_square(width: int, height: int) -> tuple[float, float, int]:
    """(left, top, side) of the centred square of a width x height image: the one crop both
    decoders take (Pillow here with this sub-pixel box, `jpeg_batch.resize_crop` rounded)."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a contiguous (3, H, W) uint8 tensor.

    The HWC->CHW copy is done by numpy: torch's copy kernel would spin up its intra-op
    thread pool for every image, which is slower than the copy itself in decode threads.
    """
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def _decode_tar(
    value: bytes, record_headers: dict[str, str], limits: DecodeLimits, size: int, defer_jpeg: bool
) -> list[DecodedImage]:
    """Decode a WebDataset-style tar batch held in memory: `KEY.<image ext>` + `KEY.json`.

    Every member header is checked (count, declared sizes, names, types) before any member
    is read; then the JSON members are parsed and the images decoded in archive order.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(value), mode="r:", tarinfo=_BoundedTarInfo) as archive:
            members = _checked_members(archive, limits)
            images = [(key, m) for key, suffix, m in members if suffix in _IMAGE_SUFFIXES]
            if not images:
                raise RejectedRecord("empty_tar", "no image members")
            key_headers = {
                key: _member_json(_read_member(archive, m), key, limits)
                for key, suffix, m in members
                if suffix == "json"
            }
            merged = {key: record_headers | key_headers.get(key, {}) for key, _ in images}
            return [
                _decode_member(_read_member(archive, m), key, merged[key], limits, size, defer_jpeg)
                for key, m in images
            ]
    # tarfile lets some malformed fields through as other errors: a GNU sparse map that is
    # not numbers (ValueError), an offset too large to seek to (OverflowError), a chain of
    # hundreds of extended headers (each parsed by a recursive call: RecursionError).
    except (tarfile.TarError, ValueError, OverflowError, RecursionError) as exc:
        raise RejectedRecord("corrupt_tar", f"{type(exc).__name__}: {exc}") from None


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a pax extended header over `MAX_PAX_BYTES` before parsing it.

    CPython before 3.11.10 / 3.12.6 parses pax headers with regular expressions that take
    quadratic time (CVE-2024-6232): a few MB of crafted header would hold a decode thread
    for hours. `_proc_pax` is tarfile's (private) hook for those headers.
    """

    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > MAX_PAX_BYTES:
            raise RejectedRecord("unsafe_tar", f"pax header of {self.size} bytes > {MAX_PAX_BYTES}")
        return super()._proc_pax(archive)


def _checked_members(
    archive: tarfile.TarFile, limits: DecodeLimits
) -> list[tuple[str, str, tarfile.TarInfo]]:
    """(key, suffix, member) for each regular file, after checking every member header.

    Stops reading headers as soon as a limit is crossed, so a tar bomb is never walked.
    Directories are skipped; links, devices, fifos and sparse files are `unsafe_tar`.
    """
    files: list[tuple[str, str, tarfile.TarInfo]] = []
    declared = 0
    for count, member in enumerate(_iter_members(archive), start=1):
        if count > limits.max_tar_members:
            raise RejectedRecord("tar_bomb", f"more than {limits.max_tar_members} members")
        if member.size < 0:  # tarfile would seek backwards: re-read headers, or fail
            raise RejectedRecord("corrupt_tar", f"{member.name!r}: size {member.size}")
        declared += member.size
        if declared > limits.max_tar_bytes:
            raise RejectedRecord(
                "tar_bomb", f"declared member sizes > max_tar_bytes {limits.max_tar_bytes}"
            )
        _check_member_safe(member)
        if member.isfile():
            files.append((*_split_name(member.name), member))
    return files


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset naming: "dir/KEY.seg.jpg" -> ("dir/KEY", "jpg") (key ends at the first dot
    of the file name; the suffix that counts is the last one, lowercased)."""
    head, slash, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return head + slash + stem, suffix.rpartition(".")[2].lower()


def _iter_members(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's member headers, read one at a time (never all up front)."""
    while (member := archive.next()) is not None:
        yield member


def _check_member_safe(member: tarfile.TarInfo) -> None:
    """Reject a member that tarfile's "data" extraction filter would refuse, and more.

    The record is never extracted, but a batch that would be unsafe to extract is hostile.
    Stricter than the filter: no links at all (a batch has no use for them) and no
    backslashes (a Windows path separator).
    """
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise RejectedRecord("unsafe_tar", f"{member.name!r}: not a regular file or directory")
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise RejectedRecord("unsafe_tar", f"{member.name!r}: path leaves the archive")


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes, read from the in-memory archive."""
    stream = archive.extractfile(member)
    assert stream is not None, "extractfile returns None only for non-files"
    return stream.read()


def _member_json(data: bytes, key: str, limits: DecodeLimits) -> dict[str, str]:
    """Per-sample headers from `KEY.json`: a JSON object of string values, as header rules."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RejectedRecord("bad_member_json", f"{key}.json: {exc}") from None
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise RejectedRecord("bad_member_json", f"{key}.json: not an object of strings")
    try:
        return _decode_headers([(k, v.encode("utf-8")) for k, v in parsed.items()], limits)
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800"
        raise RejectedRecord("bad_member_json", f"{key}.json: {exc}") from None
    except RejectedRecord as exc:
        raise RejectedRecord("bad_member_json", f"{key}.json: {exc.detail}") from None


def _decode_member(
    data: bytes, key: str, headers: dict[str, str], limits: DecodeLimits, size: int, defer_jpeg: bool
) -> DecodedImage:
    """Decode one image member (a nested tar is not an image: `unknown_format`)."""
    fmt = sniff_format(data)
    if fmt is None or fmt == "tar":
        raise RejectedRecord("unknown_format", f"member {key!r}: magic bytes {data[:8]!r}")
    return DecodedImage(_decode_image(data, fmt, limits, size, defer_jpeg), data, fmt, key, headers)
