"""JpegBatchDecoder: the batched torchvision path gives decode_record's images and verdicts.

On CPU the same code runs as on the GPU (only `device` differs), so these tests pin what the
nvJPEG path must produce; the CUDA test compares the two devices where a GPU is present.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import streamer.jpeg_batch as jpeg_batch
from deploy.daemon import jpeg_decoder
from deploy.errors import UsageError
from deploy.settings import Settings
from streamer.decode import decode_record
from streamer.jpeg_batch import JpegBatchDecoder, resize_crop
from streamer.limits import DecodeLimits
from streamer.produce import tar_batch
from streamer.records import Decoded, RawRecord, RejectedRecord
from streamer.sources import Item

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
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


def in_order(decode: Callable[[RawRecord], Decoded], records: list[RawRecord]) -> list[Decoded]:
    """The Prefetcher's parallel_map without threads."""
    return [decode(r) for r in records]


def cpu_decoder(size: int = SIZE) -> JpegBatchDecoder:
    return JpegBatchDecoder(LIMITS, size, torch.device("cpu"))


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def count_batches(monkeypatch) -> list[int]:
    """Sizes of the torchvision decode calls made from now on."""
    calls: list[int] = []
    real = jpeg_batch._decode_jpegs

    def counting(data, device):
        calls.append(len(data))
        return real(data, device)

    monkeypatch.setattr(jpeg_batch, "_decode_jpegs", counting)
    return calls


def test_batched_images_match_pillow_decoding_across_sizes_and_grey():
    sizes = [(300, 200), (200, 300), (256, 256), (97, 131)]
    values = [jpeg(photo(w, h, i)) for i, (w, h) in enumerate(sizes)]
    values.append(jpeg(photo(180, 120, 9, mode="L")))
    results = cpu_decoder()([record(v, i) for i, v in enumerate(values)], in_order)
    for value, result in zip(values, results, strict=True):
        [got] = result
        [want] = decode_record(value, [], LIMITS, SIZE)
        assert got.image.shape == (3, SIZE, SIZE) and got.image.dtype == torch.uint8
        assert got.image.is_contiguous() and got.image.device.type == "cpu"
        assert got.fmt == "jpeg" and got.encoded == value and got.key is None
        # Not bit-equal: Pillow decodes at a DCT-scaled size first and crops at half pixels.
        assert mean_abs_diff(got.image, want.image) < 2.0


def test_every_jpeg_of_a_poll_tar_members_included_decodes_in_one_call(monkeypatch):
    calls = count_batches(monkeypatch)
    members = [(Item(jpeg(photo(64, 64 + i, i)), "jpg", None, f"m{i}"), {"sample-id": f"m{i}"}) for i in range(3)]
    values = [
        jpeg(photo(80, 60, 0)),
        png(photo(40, 40, 2)),
        jpeg(photo(64, 64, 1, mode="CMYK")),  # Pillow decodes it during the check
        tar_batch(members),
        jpeg(photo(70, 90, 3)),
    ]
    headers = [("domain", b"photos")]
    results = cpu_decoder()([record(v, i, headers) for i, v in enumerate(values)], in_order)
    assert calls == [5]  # two single JPEGs and three tar members
    assert [[image.fmt for image in r] for r in results] == [["jpeg"], ["png"], ["jpeg"], ["jpeg"] * 3, ["jpeg"]]
    assert [image.key for image in results[3]] == ["00000_m0", "00001_m1", "00002_m2"]  # tar_batch keys
    assert results[3][1].headers == {"domain": "photos", "sample-id": "m1"}
    for value, result in zip(values, results, strict=True):
        want = decode_record(value, headers, LIMITS, SIZE)
        for got, expected in zip(result, want, strict=True):
            assert got.encoded == expected.encoded and got.headers == expected.headers
            assert mean_abs_diff(got.image, expected.image) < 2.0
    assert results[1][0].image.equal(decode_record(values[1], [], LIMITS, SIZE)[0].image)  # Pillow's own


def test_a_corrupt_jpeg_is_retried_alone_and_rejected_with_decode_records_reason():
    good = [jpeg(photo(64, 48, i)) for i in range(3)]
    broken = good[1][: len(good[1]) // 2]  # the header survives, the scan is cut
    [deferred] = decode_record(broken, [], LIMITS, SIZE, defer_jpeg=True)
    assert deferred.image is None
    mapped: list[list[int]] = []

    def parallel_map(decode, records):
        mapped.append([r.offset for r in records])
        return in_order(decode, records)

    results = cpu_decoder()([record(v, i) for i, v in enumerate([good[0], broken, good[2]])], parallel_map)
    assert mapped == [[0, 1, 2], [1]]  # checked together, the broken one decoded again alone
    assert isinstance(results[1], RejectedRecord) and results[1].reason == "corrupt_image"
    assert all(len(results[i]) == 1 and results[i][0].image is not None for i in (0, 2))


def test_a_corrupt_jpeg_member_rejects_its_whole_tar():
    good, broken = jpeg(photo(64, 64, 0)), jpeg(photo(64, 64, 1))[:300]
    value = tar_batch([(Item(good, "jpg", None, "a"), {}), (Item(broken, "jpg", None, "b"), {})])
    [result] = cpu_decoder()([record(value)], in_order)
    assert isinstance(result, RejectedRecord) and result.reason == "corrupt_image"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns over BOMB_PIXELS / 2
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_every_bad_corpus_record_gets_decode_records_verdict():
    corpus = sorted(BAD.glob("*.bin"))
    results = cpu_decoder(32)([record(p.read_bytes(), i) for i, p in enumerate(corpus)], in_order)
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


def test_a_device_where_torchvision_cannot_decode_falls_back_to_pillow(monkeypatch):
    assert jpeg_batch.jpeg_decode_problem(torch.device("cpu")) is None

    def broken(data, device):
        raise RuntimeError("torchvision was built without nvJPEG\nmore detail")

    monkeypatch.setattr(jpeg_batch, "_decode_jpegs", broken)
    assert jpeg_batch.jpeg_decode_problem(torch.device("cpu")) == "torchvision was built without nvJPEG"
    monkeypatch.setattr("deploy.daemon.jpeg_decode_problem", lambda device: "no nvJPEG")

    class CudaLearner:
        device = torch.device("cuda")

    assert jpeg_decoder(Settings(jpeg_decode="auto"), LIMITS, CudaLearner()) is None
    with pytest.raises(UsageError, match=r"TAILORD_JPEG_DECODE=gpu: nvJPEG does not work here \(no nvJPEG\)"):
        jpeg_decoder(Settings(jpeg_decode="gpu"), LIMITS, CudaLearner())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decoding_matches_cpu_decoding():
    values = [jpeg(photo(w, h, i)) for i, (w, h) in enumerate([(300, 200), (256, 256), (120, 90)])]
    records = [record(v, i) for i, v in enumerate(values)]
    on_cpu = cpu_decoder()(records, in_order)
    on_gpu = JpegBatchDecoder(LIMITS, SIZE, torch.device("cuda"))(records, in_order)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b[0].image.device.type == "cpu"
        assert mean_abs_diff(a[0].image, b[0].image) < 1.5  # nvJPEG's IDCT differs in the last bit
