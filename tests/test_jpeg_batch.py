"""JpegBatchDecoder: the batched torchvision path gives decode_record's images and verdicts.

On CPU the same code runs as on the GPU (only `device` differs), so these tests pin what the
nvJPEG path must produce; the CUDA test compares the two devices where a GPU is present.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import streamer.jpeg_batch as jpeg_batch
from deploy.daemon import jpeg_decoder
from deploy.errors import UsageError
from deploy.settings import Settings
from streamer.decode import decode_record, plain_jpeg_headers
from streamer.jpeg_batch import JpegBatchDecoder, resize_crop
from streamer.limits import DecodeLimits
from streamer.records import Decoded, RawRecord, RejectedRecord

BAD = Path(__file__).parent / "data" / "bad"
LIMITS = DecodeLimits()
SIZE = 64


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (JPEG-friendly, so decoders agree closely)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    return img.convert(mode)


def jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def record(value: bytes, offset: int = 0, headers: list[tuple[str, bytes]] | None = None) -> RawRecord:
    return RawRecord("t", 0, offset, value, headers or [])


def decode_each(records: list[RawRecord], size: int = SIZE) -> list[Decoded]:
    """The per-record path the Prefetcher hands the batch decoder."""
    out: list[Decoded] = []
    for r in records:
        try:
            out.append(decode_record(r.value, r.headers, LIMITS, size))
        except RejectedRecord as rejected:
            out.append(rejected)
    return out


def cpu_decoder(size: int = SIZE) -> JpegBatchDecoder:
    return JpegBatchDecoder(LIMITS, size, torch.device("cpu"))


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_batched_images_match_pillow_decoding_across_sizes_and_grey():
    values = [jpeg(photo(w, h, i)) for i, (w, h) in enumerate([(300, 200), (200, 300), (256, 256), (97, 131)])]
    values.append(jpeg(photo(180, 120, 9, mode="L")))
    results = cpu_decoder()([record(v, i) for i, v in enumerate(values)], decode_each)
    for value, result in zip(values, results, strict=True):
        [got] = result
        [want] = decode_record(value, [], LIMITS, SIZE)
        assert got.image.shape == (3, SIZE, SIZE) and got.image.dtype == torch.uint8
        assert got.image.is_contiguous() and got.image.device.type == "cpu"
        assert got.fmt == "jpeg" and got.encoded == value and got.key is None
        # Not bit-equal: Pillow decodes at a DCT-scaled size first and crops at half pixels.
        assert mean_abs_diff(got.image, want.image) < 2.0


def test_headers_match_and_only_plain_jpegs_go_to_the_batch(monkeypatch):
    calls: list[int] = []
    real = jpeg_batch._decode_jpegs

    def counting(data, device):
        calls.append(len(data))
        return real(data, device)

    monkeypatch.setattr(jpeg_batch, "_decode_jpegs", counting)
    cmyk = jpeg(photo(64, 64, 1, mode="CMYK"))
    values = [jpeg(photo(80, 60, 0)), png(photo(40, 40, 2)), cmyk, jpeg(photo(70, 90, 3))]
    headers = [("domain", b"photos"), ("sample-id", b"a")]
    handed_over: list[int] = []

    def each(records):
        handed_over.extend(r.offset for r in records)
        return decode_each(records)

    results = cpu_decoder()([record(v, i, headers) for i, v in enumerate(values)], each)
    assert calls == [2]  # both plain JPEGs in one call
    assert handed_over == [1, 2]  # the PNG and the CMYK JPEG went the per-record way
    assert all(r[0].headers == {"domain": "photos", "sample-id": "a"} for r in results)
    assert [r[0].fmt for r in results] == ["jpeg", "png", "jpeg", "jpeg"]


def test_one_corrupt_jpeg_leaves_the_others_batched_and_is_rejected_with_its_reason():
    good = [jpeg(photo(64, 48, i)) for i in range(3)]
    broken = good[1][: len(good[1]) // 2]  # the header survives, the scan is cut
    assert plain_jpeg_headers(broken, [], LIMITS) is not None
    handed_over: list[int] = []

    def each(records):
        handed_over.extend(r.offset for r in records)
        return decode_each(records)

    results = cpu_decoder()([record(v, i) for i, v in enumerate([good[0], broken, good[2]])], each)
    assert handed_over == [1]
    assert isinstance(results[1], RejectedRecord) and results[1].reason == "corrupt_image"
    assert all(len(results[i]) == 1 for i in (0, 2))


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # as decode sets it
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_every_bad_corpus_record_gets_decode_records_verdict():
    corpus = sorted(BAD.glob("*.bin"))
    results = cpu_decoder(32)([record(p.read_bytes(), i) for i, p in enumerate(corpus)],
                              lambda rs: decode_each(rs, 32))
    for path, result in zip(corpus, results, strict=True):
        assert isinstance(result, RejectedRecord), path.name
        assert result.reason == path.name.split("__")[0], path.name


def test_resize_crop_takes_the_centre_square():
    images = torch.zeros(2, 3, 40, 60, dtype=torch.uint8)
    images[..., :, 10:50] = 200  # the centred 40x40 square is bright, the sides dark
    out = resize_crop(images, 20)
    assert out.shape == (2, 3, 20, 20) and out.dtype == torch.uint8
    assert out.min().item() == 200
    assert resize_crop(images[..., :, 10:50], 40).equal(images[..., :, 10:50])


def test_daemon_picks_the_decoder_from_the_setting_and_the_device():
    class CpuLearner:
        device = torch.device("cpu")

    assert jpeg_decoder(Settings(jpeg_decode="auto"), LIMITS, CpuLearner()) is None
    assert jpeg_decoder(Settings(jpeg_decode="cpu"), LIMITS, CpuLearner()) is None
    with pytest.raises(UsageError, match="TAILORD_JPEG_DECODE=gpu needs training on CUDA"):
        jpeg_decoder(Settings(jpeg_decode="gpu"), LIMITS, CpuLearner())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decoding_matches_cpu_decoding():
    values = [jpeg(photo(w, h, i)) for i, (w, h) in enumerate([(300, 200), (256, 256), (120, 90)])]
    records = [record(v, i) for i, v in enumerate(values)]
    on_cpu = cpu_decoder()(records, decode_each)
    on_gpu = JpegBatchDecoder(LIMITS, SIZE, torch.device("cuda"))(records, decode_each)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b[0].image.device.type == "cpu"
        assert mean_abs_diff(a[0].image, b[0].image) < 1.5  # nvJPEG's IDCT differs in the last bit
