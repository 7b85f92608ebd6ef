"""Batched JPEG decoding with torchvision, on the GPU (nvJPEG) when training runs there.

At GPU speeds, Pillow decoding JPEGs one by one on a few host cores is what the train step
waits on. `JpegBatchDecoder` takes the records of one poll, checks them all on the host with
`decode_record(defer_jpeg=True)` (every limit and tar rule, up to the JPEG pixels), decodes
every JPEG of the poll, single or tar member, with one `torchvision.io.decode_jpeg(list,
device=...)` call, and centre-crops and resizes them on that device, one call per source size.
Samples stay host tensors everywhere (replay buffer, probes, store), so the resized images
come back with one copy per size.

Other formats and CMYK JPEGs are decoded by Pillow during the check. A record holding a JPEG
that torchvision fails on is decoded again by `decode_record` alone, so a corrupt record still
reaches the DLQ with its usual reason.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's, whose
`torchcodec.decoders.decode_jpeg` takes the same arguments; `_decode_jpegs` is the one call to
change when the pinned torchvision drops them. It warns of this at every call; the daemon
silences that warning for its process (`deploy.logs.configure_logging`), this module does not.
"""

from __future__ import annotations

import io
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from streamer.decode import centre_square, decode_record
from streamer.limits import DecodeLimits
from streamer.records import Decoded, ParallelMap, RawRecord, RejectedRecord


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB images on `device` from 1-D uint8 tensors of JPEG bytes."""
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def jpeg_decode_problem(device: torch.device) -> str | None:
    """Why torchvision cannot decode JPEGs on `device` (a build without nvJPEG, say), or None
    when a tiny JPEG decodes there. Checked once, so a broken decoder is never tried per poll."""
    probe = Image.new("RGB", (8, 8), (200, 30, 90))
    encoded = io.BytesIO()
    probe.save(encoded, "JPEG")
    try:
        _decode_jpegs([torch.frombuffer(bytearray(encoded.getvalue()), dtype=torch.uint8)], device)
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:200]
    return None


def resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size) uint8: the centred square, antialiased bilinear.

    The same geometry as `decode_record` (shorter side to `size`, centre crop), done as crop
    then one resize so a batch of equal-sized images is one call on its device.
    """
    left, top, side = centre_square(images.shape[-1], images.shape[-2])
    square = F.crop(images, round(top), round(left), side, side)  # as F.center_crop rounds
    if side == size:
        return square.contiguous()
    return F.resize(square, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)


class JpegBatchDecoder:
    """Decodes a poll's records, with all their plain JPEGs in one batched call on `device`.

    Usage (the Prefetcher passes a `parallel_map` running on its decode threads)::

        decoder = JpegBatchDecoder(limits, size=224, device=torch.device("cuda"))
        results = decoder(records, parallel_map)   # one result per record, in order

    Every record is first checked by `decode_record(defer_jpeg=True)` on the decode threads:
    all limits, tar safety and member headers, and Pillow decodes everything but the JPEGs.
    The JPEGs' pixels (single images and tar members alike) then decode together here. A
    record with a JPEG that torchvision cannot decode is decoded again without deferral, which
    either decodes it with Pillow or rejects it with the reason `decode_record` gives.
    """

    def __init__(self, limits: DecodeLimits, size: int, device: torch.device) -> None:
        self.limits = limits
        self.size = size
        self.device = device
        # Decode on a side stream so it overlaps the train step on the default stream.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, records: list[RawRecord], parallel_map: ParallelMap) -> list[Decoded]:
        """One result per record, in order: the decoded images or the reason to reject."""
        results = parallel_map(self._checked, records)
        pending = [
            (i, k)
            for i, result in enumerate(results)
            if not isinstance(result, RejectedRecord)
            for k, image in enumerate(result)
            if image.image is None
        ]
        pixels = self._decode_resized([results[i][k].encoded for i, k in pending])
        redo: set[int] = set()
        for (i, k), image in zip(pending, pixels, strict=True):
            if image is None:
                redo.add(i)
            else:
                results[i][k] = replace(results[i][k], image=image)
        again = sorted(redo)
        for i, result in zip(again, parallel_map(self._decoded, [records[i] for i in again]), strict=True):
            results[i] = result
        return results

    def _checked(self, record: RawRecord) -> Decoded:
        return self._decode(record, defer_jpeg=True)

    def _decoded(self, record: RawRecord) -> Decoded:
        return self._decode(record, defer_jpeg=False)

    def _decode(self, record: RawRecord, defer_jpeg: bool) -> Decoded:
        try:
            return decode_record(record.value, record.headers, self.limits, self.size, defer_jpeg=defer_jpeg)
        except RejectedRecord as rejected:
            return rejected

    def _decode_resized(self, values: list[bytes]) -> list[torch.Tensor | None]:
        """(3, size, size) uint8 host tensors of `values`, None where torchvision fails."""
        if not values:
            return []
        data = [torch.frombuffer(bytearray(v), dtype=torch.uint8) for v in values]
        stream = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
        with stream:
            decoded = self._decode_all(data)
            by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, image in enumerate(decoded):
                if image is not None:
                    by_shape[tuple(image.shape[-2:])].append(i)
            out: list[torch.Tensor | None] = [None] * len(values)
            for indices in by_shape.values():
                resized = resize_crop(torch.stack([decoded[i] for i in indices]), self.size)
                for i, image in zip(indices, resized.cpu().unbind(), strict=True):
                    out[i] = image
        return out

    def _decode_all(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode in one call; if it fails, one by one so only the bad images are left out."""
        try:
            return list(_decode_jpegs(data, self.device))
        except RuntimeError:
            return [self._decode_or_none(d) for d in data]

    def _decode_or_none(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return _decode_jpegs([data], self.device)[0]
        except RuntimeError:
            return None
