"""One SSL training step on a uint8 batch, plus the optimizer builder.

``TrainStep`` is the whole inner loop of the daemon: augment two views on the
training device, run the method, add the continual-learning penalty, skip
the step if the loss is not finite, else backward + optimizer step + hooks::

    optimizer = build_optimizer(method, preset)
    step = TrainStep(method, BatchAugment(preset.resolution), optimizer, device,
                     amp=default_amp(device), channels_last=use_channels_last(device),
                     scheduler=build_scheduler(optimizer, preset))
    for batch_u8 in stream:                  # (B, 3, S, S) uint8
        result = step(batch_u8, replay_u8)   # StepResult(loss, penalty, images, skipped, seconds)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from learners.augment import BatchAugment
from learners.device import autocast
from learners.methods import SSLMethod
from learners.presets import Preset


class StepHooks(Protocol):
    """The part of a continual-learning regularizer that the train step calls.

    (The full interface lives in ``learners/regularizers/base.py``.)
    """

    def penalty(self, backbone: nn.Module, views: torch.Tensor, features: torch.Tensor) -> torch.Tensor: ...

    def after_backward(self, backbone: nn.Module) -> None: ...

    def after_step(self, backbone: nn.Module) -> None: ...


class GradientGroup(Protocol):
    """The ranks of a data-parallel world, as the train step needs them (``deploy.world.World``)."""

    def all_true(self, flag: bool) -> bool: ...

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None: ...


@dataclass(frozen=True)
class StepResult:
    loss: float  # SSL loss of the step (nan/inf if skipped)
    penalty: float  # regularizer penalty (0.0 without a regularizer)
    images: int  # images in the step, stream + replay
    skipped: bool  # True if the loss was not finite and no update was made
    seconds: float  # wall time of the step, including the final device sync


class TrainStep:
    """Callable doing one optimization step of ``method`` on a uint8 batch.

    Args:
        method: an SSL method (``learners.methods``); moved to ``device`` here
            (and to channels_last if asked).
        augment: per-image batch augmentation producing the two views.
        optimizer: built over the method's (and regularizer's) parameters.
        device: training device; images are copied there without blocking.
        amp: bf16 autocast for the forward pass (see ``learners.device``).
        channels_last: run convolutions in NHWC layout.
        regularizer: optional continual-learning hooks (EWC, SI, distillation...).
        grad_clip: max global gradient norm, or None for no clipping.
        group: data-parallel ranks; with one, all ranks skip a step together when any
            loss is not finite, and gradients of optimizer parameters outside the method
            (a distillation predictor) are averaged. Set ``forward`` to the DDP wrapper.
        scheduler: learning-rate schedule (``build_scheduler``), stepped after every
            optimizer step (a skipped step does not advance it).

    ``forward`` is what the views go through: ``method`` itself, or a wrapper of it
    (``torch.compile``, ``DistributedDataParallel``) sharing its parameters.
    """

    def __init__(
        self,
        method: SSLMethod,
        augment: BatchAugment,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp: bool,
        channels_last: bool,
        regularizer: StepHooks | None = None,
        grad_clip: float | None = None,
        group: GradientGroup | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.method = method.to(device=device, memory_format=memory_format)
        self.forward: nn.Module = self.method
        self.augment = augment.to(device)
        self.optimizer = optimizer
        self.device = device
        self.amp = amp
        self.memory_format = memory_format
        self.regularizer = regularizer
        self.grad_clip = grad_clip
        self.group = group
        self.scheduler = scheduler
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        own = {id(p) for p in method.parameters()}
        self._outside = [p for p in self._params if id(p) not in own]

    def __call__(
        self, images_u8: torch.Tensor, replay_u8: torch.Tensor | None = None, weight: float = 1.0
    ) -> StepResult:
        """One step; ``weight`` scales the loss (data-parallel ranks holding unequal shares)."""
        start = time.perf_counter()
        x = images_u8.to(self.device, non_blocking=True)  # async from pinned memory
        if replay_u8 is not None and replay_u8.numel() > 0:
            x = torch.cat([x, replay_u8.to(self.device, non_blocking=True)])  # (B + R, 3, S, S)
        v1 = self.augment(x).contiguous(memory_format=self.memory_format)  # (N, 3, R, R)
        v2 = self.augment(x).contiguous(memory_format=self.memory_format)

        self.method.train()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, enabled=self.amp):
            out = self.forward(v1, v2, data_parallel=self.group is not None)
            penalty = (
                self.regularizer.penalty(self.method.backbone, v1, out.features)
                if self.regularizer is not None
                else torch.zeros((), device=self.device)
            )
        total = (out.loss.float() + penalty.float()) * weight
        # One device sync for the three numbers the step needs on the host.
        loss, penalty_value, total_value = torch.stack(
            [out.loss.detach().float(), penalty.detach().float(), total.detach()]
        ).tolist()
        finite = math.isfinite(total_value)
        if self.group is not None:
            finite = self.group.all_true(finite)  # DDP: every rank runs backward, or none
        if not finite:
            # Never let a NaN/inf reach the weights (or a checkpoint): no backward, no step
            # (gradients are still None from the zero_grad above).
            return StepResult(loss, penalty_value, len(x), True, time.perf_counter() - start)

        total.backward()
        if self.group is not None and self._outside:
            self.group.all_reduce_grads(self._outside)
        if self.regularizer is not None:
            self.regularizer.after_backward(self.method.backbone)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.regularizer is not None:
            self.regularizer.after_step(self.method.backbone)
        self.method.after_step()
        return StepResult(loss, penalty_value, len(x), False, time.perf_counter() - start)


def build_optimizer(
    method: SSLMethod, preset: Preset, extra_params: Iterable[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """Optimizer over the method's trainable parameters plus ``extra_params``.

    ``extra_params`` are trainable parameters owned elsewhere, e.g. a
    regularizer's distillation predictor (``regularizer.parameters()``).
    SGD (momentum 0.9) uses ``preset.lr * preset.batch_size / 256``; AdamW
    uses ``preset.lr``. Parameters without ``requires_grad`` (BYOL's target)
    are left out.
    """
    params = [p for p in method.parameters() if p.requires_grad]
    seen = {id(p) for p in params}
    params += [p for p in extra_params if p.requires_grad and id(p) not in seen]
    if preset.optimizer == "sgd":
        lr = preset.lr * preset.batch_size / 256
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=preset.weight_decay)
    if preset.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=preset.lr, weight_decay=preset.weight_decay)
    raise ValueError(f"unknown optimizer {preset.optimizer!r}; use 'sgd' or 'adamw'")


class LinearWarmup(torch.optim.lr_scheduler.LambdaLR):
    """Linear warmup to the optimizer's learning rate over ``steps`` steps, then constant.

    Optimizer step ``s`` (0-based) runs at ``lr * min(1, (s + 1) / steps)``: the first step
    at ``lr / steps``, step ``steps - 1`` and every later one at ``lr``. There is no decay:
    the daemon trains on a stream without an end, so a schedule that reaches zero at a
    fixed step (cosine) would stop learning there. The position (``last_epoch``, the
    number of optimizer steps taken) is in ``state_dict()``, which a checkpoint keeps
    beside the optimizer's (``deploy.learner``), so a restart resumes the warmup where
    it was instead of starting it again.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"warmup needs at least one step, got {steps}")

        def factor(step: int) -> float:  # a plain function: not part of state_dict()
            return min(1.0, (step + 1) / steps)

        self.steps = steps
        super().__init__(optimizer, factor)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("steps", None)  # the length comes from the preset, not the checkpoint
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        steps = self.steps
        super().load_state_dict(state_dict)
        self.steps = steps

    def finish(self) -> None:
        """Jump past the warmup (resuming a checkpoint written before warmups existed)."""
        self.last_epoch = max(self.last_epoch, self.steps - 1)
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr  # the factor is 1 from here on
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, preset: Preset) -> LinearWarmup | None:
    """``preset.warmup_steps`` of linear warmup then a constant lr; None without a warmup."""
    return LinearWarmup(optimizer, preset.warmup_steps) if preset.warmup_steps > 0 else None


def ssl_loss(
    method: SSLMethod,
    augment: BatchAugment,
    images_u8: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SSL loss of ``method`` on one uint8 batch, without any optimizer step.

    Used for the probe-set SSL loss (call under ``torch.no_grad()``; pass a
    seeded ``generator`` so every evaluation sees the same views) and for
    gradient-based importance (EWC's Fisher, MAS), where the graph is needed.
    Runs in fp32 on the method's device, in whatever train/eval mode the
    method is in (the caller decides how BatchNorm behaves).
    """
    device = next(method.parameters()).device
    augment = augment.to(device)
    x = images_u8.to(device, non_blocking=True)
    v1, v2 = augment(x, generator=generator), augment(x, generator=generator)
    return method(v1, v2).loss
