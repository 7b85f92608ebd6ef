"""Self-supervised methods: a backbone plus heads plus a loss over two views.

Every method is an ``nn.Module`` with the small interface ``SSLMethod``:

- ``backbone``: the encoder being trained (what checkpoints and snapshots keep);
- ``forward(view1, view2, data_parallel=False) -> MethodOutput(loss, features)``,
  where ``features`` are the backbone features of ``view1`` (B, D), reused by the
  continual-learning regularizers instead of a second forward pass; ``data_parallel``
  marks a DDP training step run by every rank together (SimCLR then draws its negatives
  from all ranks, MoCo enqueues all ranks' keys);
- ``after_step()``: called after each optimizer step (BYOL's and MoCo's EMA update,
  MoCo's enqueue).

Head sizes default to a fixed multiple of ``backbone.feature_dim`` (see each
class), so the small CPU backbone gets proportionally small heads and the
width-64 ResNet-18 gets the sizes of the papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class MethodOutput:
    loss: torch.Tensor  # () scalar SSL loss
    features: torch.Tensor  # (B, D) backbone features of view1


class SSLMethod(Protocol):
    """What ``TrainStep`` and the daemon need from a method (all methods are ``nn.Module``s)."""

    backbone: nn.Module

    def __call__(
        self, view1: torch.Tensor, view2: torch.Tensor, data_parallel: bool = False
    ) -> MethodOutput: ...

    def after_step(self) -> None: ...

    def parameters(self, recurse: bool = True) -> Any: ...


def build_method(name: str, backbone: nn.Module, **kwargs: Any) -> nn.Module:
    """Build a method by registry name: ``"simsiam"``, ``"byol"``, ``"simclr"`` or ``"moco"``.

    Example: ``build_method("byol", ResNet18(width=16, small_stem=True), momentum=0.996)``.
    """
    # Imported here: the method modules import ``MethodOutput`` from this package.
    from learners.methods.byol import BYOL
    from learners.methods.moco import MoCo
    from learners.methods.simclr import SimCLR
    from learners.methods.simsiam import SimSiam

    methods: dict[str, type[nn.Module]] = {"simsiam": SimSiam, "byol": BYOL, "simclr": SimCLR, "moco": MoCo}
    try:
        cls = methods[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(methods)}") from None
    return cls(backbone, **kwargs)
