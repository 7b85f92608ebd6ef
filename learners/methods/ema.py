"""Momentum (EMA) copies of a network: BYOL's target and MoCo's key encoder."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that never receives gradients (the optimizer skips it)."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- m * target + (1 - m) * online`` for parameters; buffers are copied.

    BatchNorm running statistics are copied rather than averaged: they only matter in eval
    mode, where the target should normalize like the network it follows.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o, 1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)
