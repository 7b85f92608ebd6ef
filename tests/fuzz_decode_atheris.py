"""Coverage-guided fuzzing of `decode_record` with atheris (libFuzzer). Not a pytest test.

Any exception other than `RejectedRecord` (or a wrong-shaped result) is a crash; libFuzzer
then writes the input to `crash-<sha1>` in the working directory. libFuzzer adds new
inputs to the first corpus directory, so give it a scratch copy of the bad corpus:

    .venv/bin/pip install atheris
    mkdir -p /tmp/decode-corpus && cp tests/data/bad/*.bin /tmp/decode-corpus/
    .venv/bin/python tests/fuzz_decode_atheris.py /tmp/decode-corpus -max_total_time=300
"""

from __future__ import annotations

import sys
import warnings

import atheris
import numpy  # noqa: F401  (imported before instrumentation: not worth instrumenting)
import torch

with atheris.instrument_imports(include=["streamer", "PIL"]):
    from streamer.decode import decode_record
    from streamer.limits import DecodeLimits
    from streamer.records import RejectedRecord

SIZE = 16
LIMITS = DecodeLimits(max_pixels=1 << 20, max_tar_members=16, max_tar_bytes=1 << 20)


def one_input(data: bytes) -> None:
    """Decode `data` as a record value: images of the right shape, or a RejectedRecord."""
    try:
        decoded = decode_record(data, [], LIMITS, SIZE)
    except RejectedRecord:
        return
    for item in decoded:
        if item.image.shape != (3, SIZE, SIZE) or item.image.dtype != torch.uint8:
            raise AssertionError(f"bad image {item.image.shape} {item.image.dtype}")


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # Pillow warns on most corrupt files
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
