"""Online EWC on the SSL loss: a quadratic pull towards the last anchor, weighted by Fisher.

Usage::

    reg = OnlineEWC(lam=100.0, gamma=0.9)
    loss = ssl_loss + reg.penalty(backbone, views, features)
    loss.backward(); optimizer.step()
    reg.on_experience_end(backbone, loss_fn=method_loss_on_views, batches=view_batches)

References: Kirkpatrick et al. 2017 (EWC); Schwarz et al. 2018 (online EWC / progress & compress).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from learners.regularizers.base import LossFn, QuadraticRegularizer, mean_gradient_stat


class OnlineEWC(QuadraticRegularizer):
    """``lam/2 * sum F (theta - theta*)^2``; ``F = gamma * F_old + F_new`` at each experience end.

    ``F_new`` is the empirical Fisher diagonal without labels: squared gradients of
    the SSL loss, one gradient per batch (not per sample, for speed), averaged over
    the ended experience's batches. ``theta*`` is the weights at that experience end.
    """

    scale = 0.5

    def __init__(self, lam: float, gamma: float = 0.9) -> None:
        super().__init__(lam)
        self.gamma = float(gamma)
        self.importance = {}

    def on_experience_end(self, backbone: nn.Module, loss_fn: LossFn, batches: Iterable[Tensor]) -> None:
        fisher = mean_gradient_stat(backbone, batches, loss_fn, torch.square)
        self.blend_importance(fisher, keep=self.gamma, add=1.0)
        self.set_anchor(backbone)

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), "gamma": torch.tensor(self.gamma)}

    def load_state_dict(self, state: dict[str, Tensor], backbone: nn.Module | None = None) -> None:
        super().load_state_dict(state, backbone)
        self.gamma = float(state["gamma"])
