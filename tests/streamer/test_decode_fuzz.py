"""Property tests: whatever the bytes, `decode_record` returns well-formed images or raises
`RejectedRecord` with a known reason, and nothing else.

Inputs: arbitrary bytes (bare, and behind each format's magic so they reach the Pillow
plugins), valid images of every format mutated (bit flips, truncation, insertions,
overwrites, duplicated spans), random tar batches (names, member types, pax records,
contents, tar formats, then possibly damaged) and random headers.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from streamer.decode import REASONS, decode_record
from streamer.limits import DecodeLimits
from streamer.records import DecodedImage, RejectedRecord

SIZE = 16
# Small limits, so that generated inputs also reach the limit checks.
LIMITS = DecodeLimits(
    max_record_bytes=64 * 1024,
    max_pixels=256 * 256,
    max_tar_members=5,
    max_tar_bytes=32 * 1024,
    max_header_bytes=64,
)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on corrupt files

FUZZ = settings(
    deadline=None,  # two shared cores: timing says nothing here
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def encode(mode: str, fmt: str, **params: object) -> bytes:
    """A small gradient picture in `mode`, encoded as `fmt`."""
    y, x = np.mgrid[0:10, 0:12]
    rgb = Image.fromarray((np.stack([x * 20, y * 25, (x + y) * 10], -1) % 256).astype(np.uint8))
    buf = io.BytesIO()
    rgb.convert(mode).save(buf, fmt, **params)
    return buf.getvalue()


SEEDS = [
    encode("RGB", "JPEG"),
    encode("L", "JPEG", progressive=True),
    encode("CMYK", "JPEG"),
    encode("RGB", "PNG"),
    encode("P", "PNG", transparency=0),
    encode("LA", "PNG"),
    encode("I;16", "PNG"),
    encode("RGB", "WEBP"),
    encode("RGBA", "WEBP", lossless=True),
    encode("RGB", "BMP"),
    encode("P", "BMP"),
    encode("RGB", "TIFF"),
    encode("CMYK", "TIFF", compression="tiff_lzw"),
    encode("F", "TIFF"),
    encode("RGB", "PPM"),
    encode("L", "PPM"),
    encode("P", "GIF"),
    b"P3\n2 2\n255\n255 0 0 0 255 0 0 0 255 9 9 9\n",
]
MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"II*\x00", b"MM\x00*"]
MAGICS += [b"BM", b"P6\n", b"P5 ", b"P3\n", b"P2\n", b"GIF89a"]


def check(value: bytes | None, headers: Sequence[tuple[str, bytes]] = ()) -> list[DecodedImage]:
    """Decode `value`: well-formed images, or [] after a `RejectedRecord` with a known reason."""
    try:
        decoded = decode_record(value, list(headers), LIMITS, SIZE)
    except RejectedRecord as exc:
        assert exc.reason in REASONS, exc
        return []
    assert decoded
    for item in decoded:
        assert item.image.shape == (3, SIZE, SIZE)
        assert item.image.dtype == torch.uint8
        assert item.fmt in {"jpeg", "png", "webp", "bmp", "tiff", "ppm", "gif"}
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in item.headers.items())
    return decoded


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with 1 to 6 random edits, mostly past its first 16 bytes (the magic)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        last = max(len(data) - 1, 0)
        pos = draw(st.integers(min(draw(st.sampled_from([0, 16, 16, 16])), last), last))
        edit = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "repeat"]))
        if edit == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif edit == "truncate":
            del data[pos:]
        elif edit == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + len(chunk)] = chunk
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


# Repeats weight the choices: most members are safe, so most batches get past the checks.
MEMBER_NAMES = ["a", "b", "dir/c", "d.e/f", ".hid"] * 8
MEMBER_NAMES += ["../up", "/abs", "a/../../x", "x\\..\\y"]
MEMBER_SUFFIXES = [".jpg", ".png", ".webp", ".json"] * 3 + [".tiff", ".gif", ".txt", ".tar", ""]
MEMBER_TYPES = [tarfile.REGTYPE] * 30 + [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE]
MEMBER_TYPES += [tarfile.CHRTYPE, tarfile.FIFOTYPE]

# pax records that tarfile interprets (only written in PAX_FORMAT tars).
pax_headers = st.dictionaries(
    st.sampled_from(["size", "path", "linkpath", "mtime", "uid", "hdrcharset", "comment"])
    | st.sampled_from(["GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.realsize"])
    | st.sampled_from(["GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name"]),
    st.sampled_from(["-5", "0", "1", "1.5", "a,b", "1,2,3", "9" * 30, "../x", "BINARY"])
    | st.text(max_size=12),
    max_size=3,
)
json_bytes = st.dictionaries(
    st.text(max_size=8), st.one_of(st.text(max_size=12), st.integers(), st.none()), max_size=4
).map(lambda obj: json.dumps(obj).encode())


@st.composite
def member(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes]:
    """A tar member header (sometimes with pax records) and data; a "KEY.json" mostly holds
    JSON, other members mostly an image."""
    info = tarfile.TarInfo(
        draw(st.sampled_from(MEMBER_NAMES)) + draw(st.sampled_from(MEMBER_SUFFIXES))
    )
    info.type = draw(st.sampled_from(MEMBER_TYPES))
    if draw(st.integers(0, 4)) == 0:
        info.pax_headers = draw(pax_headers)
    if info.type != tarfile.REGTYPE:
        info.linkname = draw(st.sampled_from(["a.png", "/etc/passwd", "../x"]))
        return info, b""
    usual = json_bytes if info.name.endswith(".json") else st.sampled_from(SEEDS)
    source = draw(st.sampled_from([usual] * 4 + [mutated(SEEDS), st.binary(max_size=64)]))
    data = draw(source)
    info.size = len(data)
    return info, data


@st.composite
def random_tar(draw: st.DrawFn) -> bytes:
    """A tar of 1 to 6 random members in a random format, sometimes damaged afterwards."""
    buf = io.BytesIO()
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for info, data in draw(st.lists(member(), min_size=1, max_size=6)):
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    value = buf.getvalue()
    return draw(mutated([value])) if draw(st.integers(0, 3)) == 0 else value


headers = st.lists(
    st.tuples(st.text(max_size=70), st.one_of(st.none(), st.binary(max_size=70))), max_size=6
)
valid_headers = st.lists(
    st.tuples(
        st.sampled_from(["domain", "Label", "sample-id"]), st.text(max_size=8).map(str.encode)
    ),
    max_size=3,
)


@settings(FUZZ, max_examples=400)
@given(st.one_of(st.none(), st.binary(max_size=2048)), headers)
def test_arbitrary_bytes_and_headers(value: bytes | None, headers: list[tuple[str, bytes]]):
    check(value, headers)


@settings(FUZZ, max_examples=600)
@given(st.sampled_from(MAGICS), st.binary(max_size=1024))
def test_arbitrary_bytes_behind_an_image_magic(magic: bytes, tail: bytes):
    check(magic + tail)


@settings(FUZZ, max_examples=500)
@given(mutated(SEEDS))
def test_mutated_images(value: bytes):
    check(value)


@settings(FUZZ, max_examples=250)
@given(random_tar(), valid_headers)
def test_random_tar_batches(value: bytes, headers: list[tuple[str, bytes]]):
    for item in check(value, headers):
        assert item.key is not None
        assert item.encoded in value


@pytest.mark.slow
@settings(FUZZ, max_examples=1500)
@given(st.one_of(mutated(SEEDS), random_tar()))
def test_many_more_mutations_and_tars(value: bytes):
    check(value)


def test_the_seeds_themselves_decode():
    for seed in SEEDS:
        assert len(check(seed)) == 1
