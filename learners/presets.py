"""Named training presets: backbone size, input resolution, batch size, optimizer.

``PRESETS["gpu"]`` is the standard ResNet-18 at 224 px. ``PRESETS["cpu"]``
is sized so the daemon keeps up with a stream on a small CPU box (see its
``description`` for the measurement). Pick one with ``PRESETS[name]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One training configuration.

    ``lr`` is the base learning rate for a batch of 256; ``build_optimizer``
    scales it linearly to ``batch_size`` for SGD (the SimSiam/SimCLR rule,
    ``lr = base_lr * batch_size / 256``) and uses it as is for AdamW.
    """

    name: str
    backbone_kwargs: dict[str, Any]
    resolution: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) | "adamw"
    backbone: str = "resnet18"
    warmup_steps: int = 0  # linear warmup of the lr over this many optimizer steps, then constant
    simclr_temperature: float | None = None  # NT-Xent temperature for SimCLR; None: the method's default
    description: str = ""  # why these numbers (measurements, recipe)


CPU = Preset(
    name="cpu",
    backbone_kwargs={"width": 16, "small_stem": True, "stem_stride": 1},
    resolution=32,
    batch_size=64,
    lr=0.06,
    weight_decay=5e-4,
    description="""ResNet-18 at width 16 (features 128-d), CIFAR stem at stride 1, 32 px, batch 64.

Bare SimSiam train step (2 augmented views, fwd + bwd + SGD, channels_last,
fp32; benchmarks/train_step.py), 2 cores, machine otherwise idle:
~245-255 images/s on the dev AMD EPYC (AVX2; ~200 without channels_last),
~210-245 on a Xeon pinned to 2 cores. For comparison the width-64 CIFAR
ResNet-18 does ~14-17 images/s and width 32 with stem stride 2 ~235.
Cutting width keeps the full 32x32 map after the stem (which CIFAR-size SSL
relies on), so width 16 / stride 1 is the smallest reduction reaching
200 images/s with ~25% headroom. Other busy processes lower this a lot
(oversubscribed OpenMP threads). lr/wd follow SimSiam's CIFAR
recipe (base lr 0.06 per 256 images, weight decay 5e-4).""",
)

GPU = Preset(
    name="gpu",
    backbone_kwargs={"width": 64, "small_stem": False, "stem_stride": 1},
    resolution=224,
    batch_size=256,
    lr=0.05,
    weight_decay=1e-4,
    description="""Standard ResNet-18 (torchvision shapes, 512-d features), ImageNet stem, 224 px, batch 256.

Bare SimSiam train step on one H100 (bf16 autocast, channels_last): ~4.4k
images/s (~5.7k with torch.compile; fp32 contiguous ~2.2k). SimSiam's
ImageNet recipe: SGD, base lr 0.05 per 256 images, weight decay 1e-4.""",
)

PRESETS: dict[str, Preset] = {"cpu": CPU, "gpu": GPU}
