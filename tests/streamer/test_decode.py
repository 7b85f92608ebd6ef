"""decode_record and sniff_format: the bad corpus, good images of every format and mode,
resizing, headers, limits and tar batches."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from streamer.decode import (
    BOMB_PIXELS,
    MAX_HEADERS,
    REASONS,
    centre_square,
    decode_image,
    decode_record,
    sniff_format,
)
from streamer.limits import DecodeLimits
from streamer.records import RejectedRecord

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
CORPUS = sorted(BAD.glob("*.bin"))
SIZE = 32
LIMITS = DecodeLimits()
GREEN = (10, 200, 30)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """`img` encoded by Pillow."""
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB test picture."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray((np.stack([x * 4, y * 5, (x + y) * 2], -1) % 256).astype(np.uint8))


def solid(colour: tuple[int, int, int] = GREEN, width: int = 40, height: int = 40) -> Image.Image:
    """A one-colour RGB picture."""
    return Image.new("RGB", (width, height), colour)


def make_tar(*members: tuple[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An in-memory tar of regular files; a name ending in "/" is a directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reject_reason(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]] = (),
    limits: DecodeLimits = LIMITS,
) -> str:
    """The reason `decode_record` rejects `value` with (fails the test if it decodes)."""
    with pytest.raises(RejectedRecord) as info:
        decode_record(value, list(headers), limits, SIZE)
    assert info.value.reason in REASONS
    return info.value.reason


def decode_one(value: bytes, size: int = SIZE) -> torch.Tensor:
    """The single image of a one-image record."""
    [decoded] = decode_record(value, [], LIMITS, size)
    return decoded.image


# --- the corpus of bad records ---------------------------------------------------------


def test_corpus_covers_every_reason_and_stays_small():
    reasons = {path.name.split("__")[0] for path in CORPUS}
    assert len(CORPUS) >= 30
    assert reasons <= set(REASONS)
    assert set(REASONS) - reasons == {"too_large", "bad_header"}  # these depend on limits
    assert sum(path.stat().st_size for path in CORPUS) < 1_000_000


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns over BOMB_PIXELS / 2
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.stem)
def test_bad_record_is_rejected_with_the_reason_in_its_name(path: Path):
    assert reject_reason(path.read_bytes()) == path.name.split("__")[0]


@pytest.mark.parametrize("action", ["error", "ignore"])
def test_pillow_bomb_warning_rejects_whatever_the_warning_filters(action: str):
    # 144M pixels: over BOMB_PIXELS, where Pillow only warns (it raises over twice that).
    value = (BAD / "decompression_bomb__png_12000x12000_real.bin").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter(action)
        assert reject_reason(value) == "decompression_bomb"


def test_pixel_tiers():
    exact = DecodeLimits(max_pixels=40 * 40)
    assert decode_record(encode(solid(), "PNG"), [], exact, SIZE)
    one_less = DecodeLimits(max_pixels=40 * 40 - 1)
    assert reject_reason(encode(solid(), "PNG"), limits=one_less) == "too_many_pixels"
    # No setting lifts the ceiling: a huge max_pixels still rejects bombs.
    unlimited = DecodeLimits(max_pixels=10 * BOMB_PIXELS)
    value = (BAD / "decompression_bomb__png_20000x20000_real.bin").read_bytes()
    assert reject_reason(value, limits=unlimited) == "decompression_bomb"


# --- sniffing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (encode(solid(), "JPEG"), "jpeg"),
        (encode(solid(), "PNG"), "png"),
        (encode(solid(), "WEBP"), "webp"),
        (encode(solid(), "BMP"), "bmp"),
        (b"II*\x00" + bytes(8), "tiff"),
        (b"MM\x00*" + bytes(8), "tiff"),
        (b"P6\n1 1\n255\n\0\0\0", "ppm"),
        (b"P3 1 1 255 0 0 0", "ppm"),
        (b"P5\t1 1 255 \0", "ppm"),
        (b"P2\r\n1 1\n255\n0", "ppm"),
        (make_tar(("a.png", b"x")), "tar"),
        (make_tar(("a.png", b"x"), fmt=tarfile.GNU_FORMAT), "tar"),
        (make_tar(("BM.png", b"x")), "tar"),
        (make_tar(("P6 .png", b"x")), "tar"),
        (b"GIF89a" + bytes(8), "gif"),
        (b"P4\n1 1\n\0", None),
        (b"P6", None),
        (b"P7\n", None),
        (b"RIFF\0\0\0\0WAVE", None),
        (b"MM\x00+" + bytes(8), None),
        (b"\xff\xd8", None),
        (b"PK\x03\x04", None),
        (b"", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None):
    assert sniff_format(data) == expected


# --- good images -----------------------------------------------------------------------


def with_mode(mode: str, fmt: str, **params: object) -> bytes:
    """`gradient()` converted to `mode` and encoded as `fmt`."""
    return encode(gradient().convert(mode), fmt, **params)


def grey16(value: int, big_endian: bool = False) -> Image.Image:
    """A 16-bit greyscale picture of one value."""
    mode, dtype = ("I;16B", ">u2") if big_endian else ("I;16", "<u2")
    return Image.frombytes(mode, (40, 30), np.full((30, 40), value, dtype).tobytes())


def palette_with_transparency() -> bytes:
    """A palette PNG with per-entry alpha (Pillow warns if it goes straight to RGB)."""
    return encode(gradient().convert("P"), "PNG", transparency=b"\x00\x80")


GOOD = {
    "jpeg": (encode(gradient(), "JPEG"), "jpeg"),
    "jpeg_grey": (with_mode("L", "JPEG"), "jpeg"),
    "jpeg_cmyk": (with_mode("CMYK", "JPEG"), "jpeg"),
    "jpeg_progressive": (encode(gradient(), "JPEG", progressive=True), "jpeg"),
    "png": (encode(gradient(), "PNG"), "png"),
    "png_grey": (with_mode("L", "PNG"), "png"),
    "png_grey_alpha": (with_mode("LA", "PNG"), "png"),
    "png_palette": (with_mode("P", "PNG"), "png"),
    "png_palette_transparency": (palette_with_transparency(), "png"),
    "png_rgba": (with_mode("RGBA", "PNG"), "png"),
    "png_bilevel": (with_mode("1", "PNG"), "png"),
    "png_16bit": (encode(grey16(30000), "PNG"), "png"),
    "webp": (encode(gradient(), "WEBP"), "webp"),
    "webp_lossless_rgba": (with_mode("RGBA", "WEBP", lossless=True), "webp"),
    "bmp": (encode(gradient(), "BMP"), "bmp"),
    "bmp_palette": (with_mode("P", "BMP"), "bmp"),
    "tiff_little_endian": (encode(gradient(), "TIFF"), "tiff"),
    "tiff_big_endian_16bit": (encode(grey16(30000, big_endian=True), "TIFF"), "tiff"),
    "tiff_cmyk": (with_mode("CMYK", "TIFF"), "tiff"),
    "tiff_float": (with_mode("F", "TIFF"), "tiff"),
    "tiff_deflate": (encode(gradient(), "TIFF", compression="tiff_adobe_deflate"), "tiff"),
    "ppm_p6": (encode(gradient(), "PPM"), "ppm"),
    "pgm_p5": (with_mode("L", "PPM"), "ppm"),
    "ppm_p3_ascii": (b"P3\n2 1\n255\n255 0 0  0 0 255\n", "ppm"),
    "pgm_p2_ascii": (b"P2\n2 2\n15\n0 15\n15 0\n", "ppm"),
    "ppm_16bit": (b"P6\n1 1\n65535\n" + bytes.fromhex("ffff 0000 8080"), "ppm"),
}


@pytest.mark.parametrize("name", GOOD)
def test_good_image_decodes_to_square_rgb(name: str):
    value, fmt = GOOD[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        [decoded] = decode_record(value, [], LIMITS, SIZE)
    assert decoded.image.shape == (3, SIZE, SIZE)
    assert decoded.image.dtype == torch.uint8
    assert decoded.image.is_contiguous()
    assert (decoded.fmt, decoded.key, decoded.headers) == (fmt, None, {})
    assert decoded.encoded is value


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "PPM"])
@pytest.mark.parametrize("dims", [(40, 40), (300, 100), (7, 90), (SIZE, SIZE)])
def test_lossless_solid_colour_survives_resizing_exactly(fmt: str, dims: tuple[int, int]):
    image = decode_one(encode(solid(GREEN, *dims), fmt))
    assert image.shape == (3, SIZE, SIZE)
    assert (image == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_solid_colour_stays_close(fmt: str):
    image = decode_one(encode(solid(GREEN, 400, 300), fmt, quality=95))
    expected = torch.tensor(GREEN).view(3, 1, 1)
    assert (image.int() - expected).abs().max() <= 4


def three_bands(width: int, height: int) -> Image.Image:
    """Red, green and blue thirds along the longer side."""
    pixels = np.zeros((height, width, 3), np.uint8)
    bands = np.array_split(np.arange(max(width, height)), 3)
    for channel, band in enumerate(bands):
        if width >= height:
            pixels[:, band, channel] = 255
        else:
            pixels[band, :, channel] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("dims", [(3 * SIZE, SIZE), (SIZE, 3 * SIZE), (900, 300), (300, 900)])
def test_shorter_side_is_resized_then_the_centre_is_cropped(dims: tuple[int, int]):
    image = decode_one(encode(three_bands(*dims), "PNG"))
    # Only the green middle third is kept; a bilinear edge may blend one pixel row/column.
    inner = image[:, 1:-1, 1:-1]
    assert (inner[1] == 255).all()
    assert (inner[0] == 0).all() and (inner[2] == 0).all()


def test_image_already_at_size_is_kept_pixel_for_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image = decode_one(encode(Image.fromarray(pixels), "PNG"))
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))


def test_downscaling_is_antialiased():
    # A one-pixel checkerboard averages to grey; without antialiasing it would alias.
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    image = decode_one(encode(Image.fromarray(checker), "PNG"))
    assert (image.int() - 127).abs().max() <= 8


@pytest.mark.parametrize("big_endian", [False, True])
def test_16_bit_grey_is_scaled_not_clipped(big_endian: bool):
    value = encode(grey16(128 * 257, big_endian), "TIFF" if big_endian else "PNG")
    assert (decode_one(value) == 128).all()


def test_16_bit_ppm_is_scaled():
    value = b"P6\n1 1\n65535\n" + bytes.fromhex("ffff 0000 8080")
    assert decode_one(value)[:, 0, 0].tolist() == [255, 0, 128]


def test_large_jpeg_decodes_at_reduced_scale_with_the_right_colour():
    image = decode_one(encode(solid(GREEN, 3000, 2000), "JPEG", quality=95))
    assert (image.int() - torch.tensor(GREEN).view(3, 1, 1)).abs().max() <= 4


def test_decoding_from_many_threads_gives_the_same_images():
    values = [GOOD[name][0] for name in GOOD]
    expected = [decode_one(value) for value in values]
    results: dict[int, list[torch.Tensor]] = {}

    def work(worker: int) -> None:
        results[worker] = [decode_one(value) for value in values]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for images in results.values():
        assert all(torch.equal(a, b) for a, b in zip(images, expected, strict=True))
    assert len(results) == 4


# --- headers and record limits ---------------------------------------------------------


PNG = encode(solid(), "PNG")


def test_headers_are_decoded_with_lowercased_keys():
    headers = [("Domain", b"photos"), ("label", "caf\u00e9".encode()), ("probe", None)]
    [decoded] = decode_record(PNG, headers, LIMITS, SIZE)
    assert decoded.headers == {"domain": "photos", "label": "caf\u00e9", "probe": ""}


@pytest.mark.parametrize(
    "headers",
    [
        [("label", b"\xff\xfe")],
        [("label", b"x" * (LIMITS.max_header_bytes + 1))],
        [("x" * (LIMITS.max_header_bytes + 1), b"")],
        [(f"h{i}", b"") for i in range(MAX_HEADERS + 1)],
    ],
    ids=["not_utf8", "value_too_long", "key_too_long", "too_many"],
)
def test_bad_headers_are_rejected(headers: list[tuple[str, bytes]]):
    assert reject_reason(PNG, headers) == "bad_header"


def test_headers_at_the_limits_are_accepted():
    headers = [(f"h{i}", b"x" * LIMITS.max_header_bytes) for i in range(MAX_HEADERS)]
    assert decode_record(PNG, headers, LIMITS, SIZE)


@pytest.mark.parametrize("value", [None, b""])
def test_empty_value(value: bytes | None):
    assert reject_reason(value) == "empty"


def test_record_size_limit():
    assert decode_record(PNG, [], DecodeLimits(max_record_bytes=len(PNG)), SIZE)
    assert reject_reason(PNG, limits=DecodeLimits(max_record_bytes=len(PNG) - 1)) == "too_large"


def test_size_checks_come_before_header_checks():
    too_small = DecodeLimits(max_record_bytes=10)
    assert reject_reason(PNG, [("label", b"\xff")], too_small) == "too_large"


# --- tar batches -----------------------------------------------------------------------


def test_tar_batch_yields_each_image_with_merged_headers():
    jpeg, png, webp = encode(gradient(), "JPEG"), encode(solid(), "PNG"), encode(solid(), "WEBP")
    value = make_tar(
        ("a.jpg", jpeg),
        ("a.json", b'{"Label": "cat", "domain": "member"}'),
        ("b.png", png),
        ("b.txt", b"a caption, ignored"),
        ("dir.v1/", b""),
        ("dir.v1/c.seg.webp", webp),
        ("dir.v1/c.seg.json", b'{"sample-id": "c1"}'),
    )
    record_headers = [("domain", b"stream"), ("probe", b"0")]
    decoded = decode_record(value, record_headers, LIMITS, SIZE)
    assert [(d.key, d.fmt) for d in decoded] == [("a", "jpeg"), ("b", "png"), ("dir.v1/c", "webp")]
    assert [d.encoded for d in decoded] == [jpeg, png, webp]
    assert decoded[0].headers == {"domain": "member", "label": "cat", "probe": "0"}
    assert decoded[1].headers == {"domain": "stream", "probe": "0"}
    assert decoded[2].headers == {"domain": "stream", "probe": "0", "sample-id": "c1"}
    assert all(d.image.shape == (3, SIZE, SIZE) and d.image.dtype == torch.uint8 for d in decoded)


def test_tar_member_format_is_sniffed_not_taken_from_its_name():
    [decoded] = decode_record(make_tar(("a.jpg", PNG)), [], LIMITS, SIZE)
    assert decoded.fmt == "png"


def test_json_applies_whatever_its_position_in_the_tar():
    value = make_tar(("a.json", b'{"label": "dog"}'), ("a.png", PNG))
    [decoded] = decode_record(value, [], LIMITS, SIZE)
    assert decoded.headers == {"label": "dog"}


def test_tar_member_count_limit():
    three = make_tar(("a.png", PNG), ("b.png", PNG), ("c.txt", b""))
    assert decode_record(three, [], DecodeLimits(max_tar_members=3), SIZE)
    assert reject_reason(three, limits=DecodeLimits(max_tar_members=2)) == "tar_bomb"


def test_tar_of_5000_tiny_members_is_a_bomb():
    value = make_tar(("a.png", PNG), *((f"{i}.txt", b"") for i in range(5000)))
    assert reject_reason(value) == "tar_bomb"


def test_tar_declared_bytes_limit():
    value = make_tar(("a.png", PNG), ("b.png", PNG))
    assert decode_record(value, [], DecodeLimits(max_tar_bytes=2 * len(PNG)), SIZE)
    assert reject_reason(value, limits=DecodeLimits(max_tar_bytes=2 * len(PNG) - 1)) == "tar_bomb"


def test_one_bad_member_rejects_the_whole_batch():
    value = make_tar(("a.png", PNG), ("b.png", PNG[: len(PNG) // 2]))
    assert reject_reason(value) == "corrupt_image"


def test_member_pixels_are_limited_like_single_images():
    value = make_tar(("a.png", PNG))
    assert reject_reason(value, limits=DecodeLimits(max_pixels=100)) == "too_many_pixels"


def test_long_and_non_ascii_member_names_use_small_pax_headers_and_decode():
    long_key, accented = "k" * 300, "caf\u00e9"
    value = make_tar((f"{long_key}.png", PNG), (f"{accented}.png", PNG))
    assert [d.key for d in decode_record(value, [], LIMITS, SIZE)] == [long_key, accented]


def test_a_chain_of_extended_headers_is_refused_not_recursed_into():
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 10
    link = pax.tobuf(tarfile.USTAR_FORMAT) + b"10 path=a\n".ljust(tarfile.BLOCKSIZE, b"\0")
    value = link * 2000 + make_tar(("a.png", PNG))
    assert reject_reason(value) == "corrupt_tar"


def test_defer_jpeg_checks_a_jpeg_up_to_its_pixels_and_decodes_the_rest():
    rgb, grey = encode(gradient(), "JPEG"), encode(gradient().convert("L"), "JPEG")
    cmyk = encode(gradient().convert("CMYK"), "JPEG")
    for value in (rgb, grey):
        [deferred] = decode_record(value, [("domain", b"x")], LIMITS, SIZE, defer_jpeg=True)
        assert deferred.image is None and deferred.encoded == value
        assert deferred.headers == {"domain": "x"}
    for value in (cmyk, encode(gradient(), "PNG")):  # no batched decoder takes these
        [decoded] = decode_record(value, [], LIMITS, SIZE, defer_jpeg=True)
        assert decoded.image is not None and decoded.image.equal(decode_one(value))
    small = DecodeLimits(max_pixels=100)  # the limits still apply before any deferral
    with pytest.raises(RejectedRecord, match="too_many_pixels"):
        decode_record(rgb, [], small, SIZE, defer_jpeg=True)


# --- one image, no import-time settings, one crop geometry -----------------------------------


def test_decode_image_is_decode_record_of_one_image_and_refuses_a_tar():
    value = encode(gradient(), "PNG")
    assert decode_image(value, LIMITS, SIZE).equal(decode_record(value, [], LIMITS, SIZE)[0].image)
    with pytest.raises(RejectedRecord, match="tar batch"):
        decode_image(make_tar(("a.png", value)), LIMITS, SIZE)
    with pytest.raises(RejectedRecord) as caught:
        decode_image(b"not an image", LIMITS, SIZE)
    assert caught.value.reason == "unknown_format"


def test_importing_the_decoders_changes_no_process_setting():
    """Pillow's bomb guard is set by the first decode, not the import; warning filters never."""
    code = ("import warnings, torch, torchvision.io; from PIL import Image; filters = list(warnings.filters); "
            "guard = Image.MAX_IMAGE_PIXELS; import streamer.decode, streamer.jpeg_batch; "
            "assert warnings.filters == filters, 'warning filters changed'; "
            "assert Image.MAX_IMAGE_PIXELS == guard, 'bomb guard set at import'; "
            "from streamer.decode import decode_image; from streamer.limits import DecodeLimits; "
            f"decode_image({encode(solid(), 'PNG')!r}, DecodeLimits(), 8); "
            "assert Image.MAX_IMAGE_PIXELS * 2 == streamer.decode.BOMB_PIXELS; "
            "assert warnings.filters == filters")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("height,width", [(48, 64), (65, 40), (33, 33), (50, 51), (7, 100)])
def test_centre_square_is_the_crop_of_both_decoders(height: int, width: int):
    left, top, side = centre_square(width, height)
    images = torch.arange(height * width * 3, dtype=torch.int32).reshape(1, 3, height, width)
    assert torch.equal(F.crop(images, round(top), round(left), side, side), F.center_crop(images, [side, side]))
    assert (left + side / 2, top + side / 2) == (width / 2, height / 2)
