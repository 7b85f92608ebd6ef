"""GIF records: sniffed and decoded (first frame only) under the same pixel limits as the rest."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from PIL import Image

from deploy.snapshot_request import collect_images
from streamer.decode import decode_record, sniff_format
from streamer.limits import DecodeLimits
from streamer.records import RejectedRecord
from tests.streamer.test_decode import GREEN, SIZE, gradient, make_tar, solid


def gif(*frames: Image.Image, **params: object) -> bytes:
    """`frames` saved by Pillow as one (animated, if several) GIF."""
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=len(frames) > 1, append_images=list(frames[1:]), **params)
    return buf.getvalue()


def colour_of(image: torch.Tensor) -> tuple[int, ...]:
    return tuple(image[:, SIZE // 2, SIZE // 2].tolist())


def test_palette_gif_decodes_as_gif():
    value = gif(gradient().convert("P"))
    assert sniff_format(value) == "gif"
    assert sniff_format(b"GIF87a" + bytes(8)) == sniff_format(b"GIF89a" + bytes(8)) == "gif"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [decoded] = decode_record(value, [], DecodeLimits(), SIZE)
    assert decoded.fmt == "gif" and decoded.image.shape == (3, SIZE, SIZE)
    assert decoded.image.dtype == torch.uint8 and decoded.encoded is value


def test_solid_gif_keeps_its_colour_and_transparency_does_not_warn():
    exact = solid(GREEN, 50, 40).convert("P", palette=Image.Palette.ADAPTIVE)
    [decoded] = decode_record(gif(exact), [], DecodeLimits(), SIZE)
    assert (decoded.image == torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns on palette transparency straight to RGB
        decode_record(gif(gradient().convert("P"), transparency=0), [], DecodeLimits(), SIZE)


def test_animated_gif_is_its_first_frame():
    red, blue = solid((255, 0, 0)).convert("P"), solid((0, 0, 255)).convert("P")
    [decoded] = decode_record(gif(red, blue, duration=100), [], DecodeLimits(), SIZE)
    assert colour_of(decoded.image) == (255, 0, 0)


def test_gif_obeys_the_pixel_limit_and_rejects_garbage():
    value = gif(solid(GREEN, 100, 100).convert("P"))
    with pytest.raises(RejectedRecord) as err:
        decode_record(value, [], DecodeLimits(max_pixels=99 * 100), SIZE)
    assert err.value.reason == "too_many_pixels"
    with pytest.raises(RejectedRecord) as err:
        decode_record(b"GIF89a" + bytes(8), [], DecodeLimits(), SIZE)
    assert err.value.reason == "corrupt_image"


def test_gif_in_a_tar_batch_and_in_a_targets_folder(tmp_path):
    value = gif(solid(GREEN).convert("P"))
    [decoded] = decode_record(make_tar(("k.gif", value)), [], DecodeLimits(), SIZE)
    assert decoded.fmt == "gif" and decoded.key == "k"
    (tmp_path / "a.gif").write_bytes(value)
    (tmp_path / "b").write_bytes(value)  # no suffix: found by its magic bytes
    assert [p.name for p in collect_images(tmp_path)] == ["a.gif", "b"]
