"""Deep (16-bit, float) greys decode band by band: bounded extra memory, same 8-bit values."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from streamer.decode import _high_depth_to_l, decode_record
from streamer.limits import DecodeLimits

HEIGHT, WIDTH = 2000, 2000  # 4 megapixels: 8 MB as uint16


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("dtype", "fmt"), [("<u2", "PNG"), (np.float32, "TIFF")])
def test_deep_grey_decode_holds_less_than_one_uint16_copy(dtype, fmt):
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    value = encoded(((x * 31 + y * 7) % 65536).astype(dtype), fmt)
    tracemalloc.start()  # numpy arrays and bytes are traced; Pillow's own image memory is not
    try:
        [decoded] = decode_record(value, [], DecodeLimits(), 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.image.shape == (3, 32, 32)
    assert peak <= HEIGHT * WIDTH * 2  # float64 copies took 12-15x this


def test_bands_give_the_rounded_values_everywhere():
    pixels = np.random.default_rng(0).integers(0, 65536, (700, 301)).astype("<u2")  # several bands
    got = np.asarray(_high_depth_to_l(Image.fromarray(pixels)))
    assert np.array_equal(got, np.rint(pixels / 257).astype(np.uint8))
    floats = np.random.default_rng(1).normal(size=(700, 301)).astype(np.float32)
    floats[:400] = np.nan  # whole bands of NaN: their minimum is ignored, they map to 0
    got = np.asarray(_high_depth_to_l(Image.fromarray(floats)))
    low, high = np.nanmin(floats), np.nanmax(floats)
    expected = np.rint(np.nan_to_num(floats.astype(np.float64) - low) * (255 / (high - low)))
    assert np.array_equal(got, expected.astype(np.uint8))
