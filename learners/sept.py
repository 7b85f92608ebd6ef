"""SEPT: continue a checkpoint's self-supervised method on a small set of retrieved images.

The snapshot engine (deploy/snapshots.py) retrieves the stored samples nearest a target
task and hands them here, decoded, with the method rebuilt from a checkpoint. Training
uses the daemon's step (`TrainStep` with the preset's optimizer, `build_optimizer`) at
`SEPT_LR_SCALE` times the preset's learning rate, for at most `max_steps` batches.

SEPT runs beside the daemon's training (HTTP threads): its crops and batch order come from
its own generators seeded with `SEPT_SEED`, so it never reads, advances or reseeds the
global RNGs that drive the daemon's augmentation, and the same inputs give the same model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from learners.augment import BatchAugment
from learners.device import default_amp, use_channels_last
from learners.methods import SSLMethod
from learners.presets import Preset
from learners.train_step import TrainStep, build_optimizer

SEPT_EPOCHS = 10  # passes over the retrieved images (cut short by max_steps)
SEPT_MAX_STEPS = 200  # batches at most, whatever the budget
SEPT_LR_SCALE = 0.5  # of the preset's learning rate: a short fine-tune, not a restart
SEPT_SEED = 0  # SEPT's own generators: the daemon's training RNG stream is never drawn from


class SeededAugment(nn.Module):
    """`augment` drawing from `generator` when called without one (as TrainStep calls it)."""

    def __init__(self, augment: BatchAugment, generator: torch.Generator) -> None:
        super().__init__()
        self.augment = augment
        self.generator = generator

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.augment(images, generator=generator if generator is not None else self.generator)


def sept_step(method: SSLMethod, preset: Preset, inputs: dict[str, Any], device: torch.device,
              seed: int = SEPT_SEED) -> TrainStep:
    """The daemon's train step for `method` at `SEPT_LR_SCALE` x the preset's lr, with seeded crops.

    `inputs` is a checkpoint manifest's `input` entry (resolution, mean, std).
    """
    preset = replace(preset, lr=preset.lr * SEPT_LR_SCALE)
    views = torch.Generator(device=device).manual_seed(seed)
    augment = SeededAugment(BatchAugment(inputs["resolution"], mean=inputs["mean"], std=inputs["std"]), views)
    return TrainStep(method, augment, build_optimizer(method, preset), device,
                     amp=default_amp(device), channels_last=use_channels_last(device))


def continue_pretraining(step: TrainStep, images: torch.Tensor, batch_size: int, epochs: int = SEPT_EPOCHS,
                         max_steps: int = SEPT_MAX_STEPS, seed: int = SEPT_SEED) -> int:
    """Train `step` on `images` (N, 3, S, S) uint8 in shuffled batches; the steps that updated weights.

    At most `max_steps` batches are attempted; a batch of one image is skipped (BatchNorm
    needs two), and so is a step `TrainStep` skipped (a non-finite loss).
    """
    batch = min(batch_size, len(images))
    shuffle = torch.Generator().manual_seed(seed)
    steps = attempted = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=shuffle)
        for start in range(0, len(images), batch):
            chunk = order[start:start + batch]
            if len(chunk) < 2 or attempted >= max_steps:
                continue
            attempted += 1
            steps += not step(images[chunk]).skipped
    return steps
