"""Batched JPEG decoding with torchvision, on the GPU (nvJPEG) when training runs there.

At GPU speeds, Pillow decoding JPEGs one by one on a few host cores is what the train step
waits on. `JpegBatchDecoder` takes the records of one poll, checks each plain JPEG's header on
the host with the same limits as `decode_record` (`plain_jpeg_headers`), decodes them all with
one `torchvision.io.decode_jpeg(list, device=...)` call, and centre-crops and resizes them on
that device, one call per source size. Samples stay host tensors everywhere (replay buffer,
probes, store), so the resized batch comes back with one copy.

Everything else goes through the per-record decoder it is given: other formats, tar batches,
CMYK JPEGs, and any JPEG that torchvision fails on, so a corrupt record still reaches the DLQ
with the reason `decode_record` gives it.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's, whose
`torchcodec.decoders.decode_jpeg` takes the same arguments; `_decode_jpegs` is the one call to
change when the pinned torchvision drops them.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import nullcontext

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from streamer.decode import plain_jpeg_headers
from streamer.limits import DecodeLimits
from streamer.records import Decoded, DecodedImage, DecodeEach, RawRecord


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """(3, H, W) uint8 RGB images on `device` from 1-D uint8 tensors of JPEG bytes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size) uint8: the centred square, antialiased bilinear.

    The same geometry as `decode_record` (shorter side to `size`, centre crop), done as crop
    then one resize so a batch of equal-sized images is one call on its device.
    """
    height, width = images.shape[-2:]
    side = min(height, width)
    square = F.center_crop(images, [side, side])
    if side == size:
        return square.contiguous()
    return F.resize(square, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)


class JpegBatchDecoder:
    """Decodes a poll's records, the plain JPEGs of it in one batched call on `device`.

    Usage (the Prefetcher passes its own thread-pooled per-record decoder as `decode_each`)::

        decoder = JpegBatchDecoder(limits, size=224, device=torch.device("cuda"))
        results = decoder(records, decode_each)   # one result per record, in order
    """

    def __init__(self, limits: DecodeLimits, size: int, device: torch.device) -> None:
        self.limits = limits
        self.size = size
        self.device = device
        # Decode on a side stream so it overlaps the train step on the default stream.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, records: list[RawRecord], decode_each: DecodeEach) -> list[Decoded]:
        """One result per record, in order: the decoded images or the reason to reject."""
        results: dict[int, Decoded] = {}
        batch: list[int] = []
        headers: dict[int, dict[str, str]] = {}
        for i, record in enumerate(records):
            record_headers = plain_jpeg_headers(record.value, record.headers, self.limits)
            if record_headers is not None:
                batch.append(i)
                headers[i] = record_headers
        images = self._decode_resized([records[i].value for i in batch])
        for i, image in zip(batch, images, strict=True):
            if image is not None:
                results[i] = [DecodedImage(image, records[i].value, "jpeg", None, headers[i])]
        rest = [i for i in range(len(records)) if i not in results]
        results.update(zip(rest, decode_each([records[i] for i in rest]), strict=True))
        return [results[i] for i in range(len(records))]

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
