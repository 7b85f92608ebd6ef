"""Device choice and the per-device speed settings (autocast, memory format).

Defaults measured on the 2-core AVX2 CPU (no bf16 hardware) of the
development machine, ResNet-18 width 16 at 32 px, batch 64, SimSiam step:

- channels_last: ~255 vs ~200 images/s (contiguous), so it is on for CPU too;
- bf16 autocast on CPU: ~16 vs ~245 images/s (emulated bf16), so it is off
  on CPU unless asked for (CPUs with AMX/avx512_bf16 may gain from it).

On CUDA both are on: bf16 autocast uses the tensor cores and needs no loss
scaling, and channels_last is the layout cuDNN's fast convolutions use.
Measured on one H100, ResNet-18 at 224 px, batch 256, SimSiam step: fp32
~2.2k images/s, bf16 ~2.4k, channels_last ~3.3k, both ~4.4k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` as asked.

    Raises ``ValueError`` if CUDA is requested but not available, so a
    misconfigured GPU deployment fails at start instead of training on CPU.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {requested!r}; use auto, cpu or cuda[:N]")
    return device


def default_amp(device: torch.device) -> bool:
    """Whether bf16 autocast is on by default: on CUDA yes, on CPU no (measured slower)."""
    return device.type == "cuda"


def use_channels_last(device: torch.device) -> bool:
    """Whether to train in channels_last memory format (faster on both CPU and CUDA here)."""
    return device.type in ("cpu", "cuda")


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool | None = None) -> Iterator[None]:
    """bf16 autocast for ``device``; ``enabled=None`` means ``default_amp(device)``.

    Example::

        with autocast(device, enabled=amp):
            out = method(view1, view2)
    """
    if enabled is None:
        enabled = default_amp(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled):
        yield
