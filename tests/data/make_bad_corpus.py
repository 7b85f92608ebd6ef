"""Regenerate tests/data/bad/: one broken or hostile record value per file.

Each file is named `<expected reason>__<what it is>.bin`; tests/streamer/test_decode.py checks that
`decode_record` rejects it with that reason under the default `DecodeLimits` and that
nothing else ever comes out. The output is deterministic (fixed pixels, tar mtimes 0), so
rerunning the script changes no file.

    .venv/bin/python tests/data/make_bad_corpus.py
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).parent / "bad"


# --- valid building blocks ---------------------------------------------------------------


def picture(width: int = 64, height: int = 48) -> Image.Image:
    """A small RGB gradient: compressible, and every format encodes it."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) % 256
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def encode(fmt: str, **params: object) -> bytes:
    """`picture()` encoded by Pillow as `fmt`."""
    buf = io.BytesIO()
    picture().save(buf, fmt, **params)
    return buf.getvalue()


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    """`data` with `new` written over it at `offset`."""
    return data[:offset] + new + data[offset + len(new) :]


# --- hand-built image headers ------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A 1-bit greyscale PNG with the given compressed IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def blank_png(width: int, height: int) -> bytes:
    """A real, fully valid all-black 1-bit PNG: tiny on disk, width*height once decoded."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return png(width, height, idat)


def bmp_header(width: int, height: int, bits: int = 24) -> bytes:
    """A BMP file and info header with no pixel data after them."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian 8-bit greyscale TIFF whose single strip holds one byte."""
    tags = [  # (tag, type SHORT=3/LONG=4, value)
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 12 * 9 + 4),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, 1),
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + b"\x80"


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 frame header claims another size."""
    data = encode("JPEG", quality=80)
    sof = data.index(b"\xff\xc0")
    return patch(data, sof + 5, struct.pack(">HH", height, width))


def gif_with_size(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims `width` x `height`."""
    buf = io.BytesIO()
    picture(8, 8).convert("P").save(buf, "GIF")
    return patch(buf.getvalue(), 6, struct.pack("<HH", width, height))


# --- tar batches ---------------------------------------------------------------------------

GOOD_PNG = png(8, 8, zlib.compress(bytes(2) * 8))


def entry(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    """One tar member: header and data."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mtime = kind, link, len(data), 0
    if kind != tarfile.REGTYPE:
        info.size = 0
    return info, data


def tar(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """A plain (uncompressed) POSIX tar of `entries`, built in memory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def tar_declaring(size: int, fmt: int) -> bytes:
    """A one-member tar whose header declares `size` bytes of data that are not there."""
    info = tarfile.TarInfo("huge.png")
    info.size, info.mtime = size, 0
    return info.tobuf(fmt, "utf-8", "surrogateescape") + GOOD_PNG + bytes(1024)


def pax_record(keyword: str, value: str) -> bytes:
    """One pax extended header record: "<length> <keyword>=<value>\\n"."""
    body = f" {keyword}={value}\n".encode()
    length = len(body) + 1
    while len(body) + len(str(length)) != length:  # the length counts its own digits
        length += 1
    return str(length).encode() + body


def pax_tar(pax_body: bytes) -> bytes:
    """A tar whose first member, a good PNG, comes after a hand-written pax header."""
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size, pax.mtime = tarfile.XHDTYPE, len(pax_body), 0
    padding = bytes(-len(pax_body) % tarfile.BLOCKSIZE)
    return pax.tobuf(tarfile.USTAR_FORMAT) + pax_body + padding + tar(entry("a.png", GOOD_PNG))


def with_negative_size(archive: bytes) -> bytes:
    """`archive` with its first member's size set to -1024 (base-256) and the checksum fixed."""
    header = bytearray(archive[: tarfile.BLOCKSIZE])
    header[124:136] = b"\xff" * 10 + (-1024 & 0xFFFF).to_bytes(2, "big")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + archive[tarfile.BLOCKSIZE :]


def zip_of_jpeg() -> bytes:
    """A zip archive holding one JPEG (archives other than tar are not a wire format)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(zipfile.ZipInfo("a.jpg", (1980, 1, 1, 0, 0, 0)), encode("JPEG"))
    return buf.getvalue()


def gzip_tar() -> bytes:
    """A gzip-compressed tar: only plain tar is a wire format."""
    return gzip.compress(tar(entry("a.png", GOOD_PNG)), mtime=0)


# --- the corpus ----------------------------------------------------------------------------


def cases() -> dict[str, Callable[[], bytes]]:
    """File name -> builder of its content."""
    jpeg, png_rgb, webp = encode("JPEG", quality=90), encode("PNG"), encode("WEBP", quality=80)
    tiff, bmp, ppm = encode("TIFF"), encode("BMP"), encode("PPM")
    rng = np.random.default_rng(7)
    return {
        "empty__zero_bytes": lambda: b"",
        # not an image of an allowed format
        "unknown_format__text": lambda: b"hello, this is not an image\n" * 4,
        "unknown_format__elf": lambda: b"\x7fELF\x02\x01\x01" + bytes(57),
        "unknown_format__pdf": lambda: b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n",
        "unknown_format__svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        "unknown_format__zip": zip_of_jpeg,
        "unknown_format__gzip_tar": gzip_tar,
        "unknown_format__random": lambda: b"\0" + rng.integers(0, 256, 1024, np.uint8).tobytes(),
        "unknown_format__ppm_p4_bitmap": lambda: b"P4\n8 8\n" + bytes(8),
        "unknown_format__tar_member_text_named_jpg": lambda: tar(entry("k.jpg", b"not a jpeg")),
        "unknown_format__tar_member_nested_tar": lambda: tar(
            entry("k.jpg", tar(entry("a.png", GOOD_PNG)))
        ),
        # a known format, broken
        "corrupt_image__jpeg_truncated": lambda: jpeg[: len(jpeg) // 2],
        "corrupt_image__jpeg_bad_huffman_table": lambda: patch(
            jpeg, jpeg.index(b"\xff\xc4") + 4, b"\xff" * 17
        ),
        "corrupt_image__jpeg_lossless_sof3": lambda: patch(
            jpeg, jpeg.index(b"\xff\xc0"), b"\xff\xc3"
        ),
        "corrupt_image__jpeg_zero_width": lambda: jpeg_with_size(0, 48),
        "corrupt_image__jpeg_only_soi": lambda: b"\xff\xd8\xff",
        "corrupt_image__png_truncated": lambda: png_rgb[: len(png_rgb) // 2],
        "corrupt_image__png_garbage_idat": lambda: patch(
            png_rgb, png_rgb.index(b"IDAT") + 10, b"\xff" * 50
        ),
        "corrupt_image__png_bad_ihdr_crc": lambda: patch(png_rgb, 18, b"\xee"),
        "corrupt_image__png_zero_width": lambda: png(0, 8, zlib.compress(b"")),
        "corrupt_image__png_ztxt_bomb": lambda: png(
            8,
            8,
            zlib.compress(bytes(2) * 8),
            extra=png_chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(16 << 20), 9)),
        ),
        "corrupt_image__webp_truncated": lambda: webp[: len(webp) // 2],
        "corrupt_image__webp_bad_start_code": lambda: patch(
            webp, webp.index(b"\x9d\x01\x2a"), b"\0\0\0"
        ),
        "corrupt_image__webp_garbage_frame": lambda: patch(
            webp, webp.index(b"\x9d\x01\x2a") + 20, b"\xff" * 60
        ),
        "corrupt_image__tiff_truncated": lambda: tiff[: len(tiff) // 2],
        "corrupt_image__tiff_ifd_past_end": lambda: patch(tiff, 4, struct.pack("<I", 10**6)),
        "corrupt_image__bmp_truncated": lambda: bmp[: len(bmp) // 2],
        "corrupt_image__bmp_7_bits_per_pixel": lambda: patch(bmp, 28, b"\x07"),
        "corrupt_image__bm_text": lambda: b"BMW is a car, not a bitmap\n" * 3,
        "corrupt_image__ppm_truncated": lambda: ppm[: len(ppm) // 2],
        "corrupt_image__ppm_bad_header": lambda: b"P6\nabc def\n255\n" + bytes(100),
        "corrupt_image__gif_truncated": lambda: gif_with_size(64, 48)[:30],
        "corrupt_image__tar_member_truncated_png": lambda: tar(
            entry("a.png", GOOD_PNG), entry("b.png", png_rgb[: len(png_rgb) // 2])
        ),
        # pixel counts (default max_pixels 40M; decompression_bomb over 2**27)
        "too_many_pixels__png_8000x8000_real": lambda: blank_png(8000, 8000),
        "too_many_pixels__jpeg_claims_60000x1000": lambda: jpeg_with_size(60000, 1000),
        "too_many_pixels__bmp_claims_9000x9000": lambda: bmp_header(9000, 9000),
        "too_many_pixels__tiff_claims_10000x10000": lambda: tiff_header(10000, 10000),
        "too_many_pixels__gif_claims_8000x8000": lambda: gif_with_size(8000, 8000),
        "decompression_bomb__png_20000x20000_real": lambda: blank_png(20000, 20000),
        "decompression_bomb__png_12000x12000_real": lambda: blank_png(12000, 12000),
        "decompression_bomb__png_claims_100000x100000": lambda: png(
            100000, 100000, zlib.compress(b"")
        ),
        "decompression_bomb__bmp_claims_100000x100000": lambda: bmp_header(100000, 100000),
        "decompression_bomb__tiff_claims_100000x100000": lambda: tiff_header(100000, 100000),
        "decompression_bomb__jpeg_claims_65535x65535": lambda: jpeg_with_size(65535, 65535),
        "decompression_bomb__gif_claims_65535x65535": lambda: gif_with_size(65535, 65535),
        "decompression_bomb__tar_member_claims_100000x100000": lambda: tar(
            entry("a.png", GOOD_PNG), entry("b.bmp", bmp_header(100000, 100000))
        ),
        # tar batches
        "corrupt_tar__bad_header_checksum": lambda: patch(
            tar(entry("a.png", GOOD_PNG)), 148, b"0000000\0"
        ),
        "corrupt_tar__truncated_member": lambda: tar(entry("a.png", bytes(4096)))[:1024],
        "unsafe_tar__dotdot": lambda: tar(entry("../evil.png", GOOD_PNG)),
        "unsafe_tar__nested_dotdot": lambda: tar(entry("a/../../evil.png", GOOD_PNG)),
        "unsafe_tar__absolute": lambda: tar(entry("/abs.png", GOOD_PNG)),
        "unsafe_tar__backslash": lambda: tar(entry("..\\evil.png", GOOD_PNG)),
        "unsafe_tar__symlink": lambda: tar(
            entry("a.png", GOOD_PNG), entry("b.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        ),
        "unsafe_tar__hardlink": lambda: tar(
            entry("a.png", GOOD_PNG), entry("b.png", kind=tarfile.LNKTYPE, link="a.png")
        ),
        "unsafe_tar__char_device": lambda: tar(entry("zero.png", kind=tarfile.CHRTYPE)),
        "unsafe_tar__fifo": lambda: tar(
            entry("a.png", GOOD_PNG), entry("f", kind=tarfile.FIFOTYPE)
        ),
        "corrupt_tar__negative_size": lambda: with_negative_size(tar(entry("a.png", GOOD_PNG))),
        "corrupt_tar__pax_negative_size": lambda: pax_tar(pax_record("size", "-5")),
        "corrupt_tar__pax_sparse_map_not_numbers": lambda: pax_tar(
            pax_record("GNU.sparse.map", "a,b")
        ),
        # CVE-2024-6232: these take tarfile (CPython < 3.11.10) quadratic time to parse
        "unsafe_tar__pax_header_quadratic_regex": lambda: pax_tar(b"2 " * 8192 + b"="),
        "unsafe_tar__pax_sparse_quadratic_regex": lambda: pax_tar(
            pax_record("GNU.sparse.size", "100") + b"1" * 16384
        ),
        "tar_bomb__member_declares_1gib": lambda: tar_declaring(1 << 30, tarfile.USTAR_FORMAT),
        "tar_bomb__pax_size_1tb": lambda: tar_declaring(10**12, tarfile.PAX_FORMAT),
        "empty_tar__only_txt": lambda: tar(entry("a.txt", b"caption")),
        "empty_tar__only_directory": lambda: tar(entry("dir", kind=tarfile.DIRTYPE)),
        "empty_tar__json_without_image": lambda: tar(entry("a.json", b'{"label": "cat"}')),
        "bad_member_json__not_json": lambda: tar(entry("a.png", GOOD_PNG), entry("a.json", b"{")),
        "bad_member_json__array": lambda: tar(entry("a.png", GOOD_PNG), entry("a.json", b"[]")),
        "bad_member_json__number_value": lambda: tar(
            entry("a.png", GOOD_PNG), entry("a.json", b'{"label": 3}')
        ),
        "bad_member_json__not_utf8": lambda: tar(
            entry("a.png", GOOD_PNG), entry("a.json", b'{"label": "\xff"}')
        ),
        "bad_member_json__deep_nesting": lambda: tar(
            entry("a.png", GOOD_PNG), entry("a.json", b'{"a": ' + b"[" * 10_000 + b"}")
        ),
        "bad_member_json__lone_surrogate": lambda: tar(
            entry("a.png", GOOD_PNG), entry("a.json", b'{"label": "\\ud800"}')
        ),
        "bad_member_json__value_over_4096_bytes": lambda: tar(
            entry("a.png", GOOD_PNG), entry("a.json", b'{"label": "' + b"x" * 5000 + b'"}')
        ),
    }


def main() -> None:
    """Write every case, removing files of cases that no longer exist."""
    OUT.mkdir(exist_ok=True)
    built = {f"{name}.bin": build() for name, build in cases().items()}
    for stale in OUT.glob("*.bin"):
        if stale.name not in built:
            stale.unlink()
    for name, data in built.items():
        (OUT / name).write_bytes(data)
    total = sum(map(len, built.values()))
    print(f"wrote {len(built)} files, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
