"""Named training presets: backbone size, input resolution, batch size, optimizer.

``PRESETS["gpu"]`` is the papers' ResNet-50 at 224 px. ``PRESETS["cpu"]``
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
    lr=0.06,  # per 256 images: 0.015 actual at batch 64 (SimSiam's CIFAR lr)
    weight_decay=5e-4,
    description="""ResNet-18 at width 16 (features 128-d), CIFAR stem at stride 1, 32 px, batch 64;
SGD base lr 0.06 per 256 (0.015 actual), SimCLR at its default temperature 0.5, no warmup.

Speed. Bare SimSiam train step (2 augmented views, fwd + bwd + SGD, channels_last,
fp32; benchmarks/train_step.py), 2 cores, machine otherwise idle:
~245-255 images/s on the dev AMD EPYC (AVX2; ~200 without channels_last),
~210-245 on a Xeon pinned to 2 cores. For comparison the width-64 CIFAR
ResNet-18 does ~14-17 images/s and width 32 with stem stride 2 ~235.
Cutting width keeps the full 32x32 map after the stem (which CIFAR-size SSL
relies on), so width 16 / stride 1 is the smallest reduction reaching
200 images/s with ~25% headroom. Other busy processes lower this a lot
(oversubscribed OpenMP threads).

Recipe (benchmarks/recipe.py; 2026-12-01, the 2-core AMD EPYC dev box shared with other
jobs, load 5-10, 1 torch thread, ~13-32 images/s): digits + fashion shuffled, seed 0, probe
sets of 405 / 400 held-out images scored by leave-one-out weighted kNN (k <= 20) and a
5-fold linear probe (learners/protocol.py). Floors: raw pixels kNN 94.1 / 65.8, linear
94.3 / 70.3 (digits / fashion); untrained encoder kNN 84.0 / 56.3, linear 89.9 / 66.3.
This preset, kNN after 5k / 10k images: 80.7 / 62.3, 78.8 / 66.3; at 10k linear 90.9 / 66.3.
SimCLR T 0.2, lr 0.3 actual, 30-step warmup, kNN after 5k / 10k / 15k / 20k: 60.0 / 64.8,
71.6 / 65.3, 74.1 / 67.0, 79.5 / 68.0; at 20k linear 91.9 / 71.0. At the same images (5k,
10k) this preset scores higher on digits kNN, so it stays; neither beats the untrained
encoder on digits kNN within 20k images, and the comparison past 10k is still to measure
(longer runs: python -m benchmarks.recipe --images 60000 ...). A pilot (T 0.2, batch 128,
lr 0.5 with warmup and a cosine decay, 128k images) beat the untrained encoder on both:
kNN 90.2 / 77.5 vs 87.4 / 71.7, linear 97.2 / 81.1 vs 93.3 / 72.6 (its own probe split).
Warmup (preset.warmup_steps) and SimCLR temperature (preset.simclr_temperature) are preset
fields for such a recipe: a warmup is linear then constant, never decaying (the daemon
trains on a stream without an end; a schedule reaching zero at a fixed step would stop
learning there), and its position is checkpointed (scheduler.pt), so a restart does not
warm up again.""",
)

GPU = Preset(
    name="gpu",
    backbone="resnet50",
    backbone_kwargs={"small_stem": False, "stem_stride": 1},
    resolution=224,
    batch_size=256,
    lr=0.03,
    weight_decay=1e-4,
    warmup_steps=50_000,
    simclr_temperature=0.2,
    description="""torchvision ResNet-50 (2048-d features), ImageNet stem, 224 px, batch 256: the backbone
and input of SimCLR, MoCo v2, BYOL and SimSiam's ImageNet results, so ImageNet weights
(TAILORD_INIT_WEIGHTS) load as they are.

Optimizer: MoCo v2's recipe for batch 256 (SimCLR's own needs LARS at batch 4096):
SGD (momentum 0.9), base lr 0.03 per 256 images
(scaled linearly if TAILORD_BATCH_SIZE changes it), weight decay 1e-4, SimCLR temperature
0.2 (MoCo v2's; SimCLR's 0.1 was tuned for batch 4096). Linear warmup of 50,000 steps:
SimCLR's 10 ImageNet epochs (10 x 1.28M images / 256 per step), then constant (no decay on
an endless stream; the warmup's position is checkpointed).

One GPU: the step runs 2 x 256 images through ResNet-50 (bf16 autocast, channels_last);
estimated at ~30 GB of activations, so it wants a 40 GB+ GPU; on a 24 GB one set
TAILORD_BATCH_SIZE=128. Not measured here: no GPU run of benchmarks/train_step.py or
benchmarks/recipe.py with ResNet-50 yet (the ResNet-18 this preset had before did ~4.4k
images/s on one H100, docs/scaling.md).""",
)

PRESETS: dict[str, Preset] = {"cpu": CPU, "gpu": GPU}
