"""MAS: importance = sensitivity of the features' squared norm to each weight (label-free).

Usage::

    reg = MAS(lam=1.0)
    loss = ssl_loss + reg.penalty(backbone, views, features)
    loss.backward(); optimizer.step()
    reg.on_experience_end(backbone, loss_fn=method_loss_on_views, batches=view_batches)

References: Aljundi et al. 2018 (Memory Aware Synapses), as implemented in Avalanche's ``MASPlugin``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from learners.regularizers.base import LossFn, QuadraticRegularizer, mean_gradient_stat


class MAS(QuadraticRegularizer):
    """``lam/2 * sum Omega (theta - theta*)^2``, ``Omega_new = mean_batches |d ||f||^2 / d theta|``.

    ``f = backbone(views)``: the SSL loss is not needed (``loss_fn`` is ignored).
    ``||f||^2`` is averaged over the batch before differentiating (one gradient per
    batch, as Avalanche does). Accumulation across experiences is
    ``Omega = alpha * Omega_old + (1 - alpha) * Omega_new``.
    """

    scale = 0.5

    def __init__(self, lam: float, alpha: float = 0.5) -> None:
        super().__init__(lam)
        self.alpha = float(alpha)
        self.importance = {}

    def on_experience_end(self, backbone: nn.Module, loss_fn: LossFn, batches: Iterable[Tensor]) -> None:
        def squared_norm(views: Tensor) -> Tensor:
            return backbone(views).float().pow(2).sum(dim=1).mean()

        omega = mean_gradient_stat(backbone, batches, squared_norm, torch.abs)
        self.blend_importance(omega, keep=self.alpha, add=1.0 - self.alpha)
        self.set_anchor(backbone)

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), "alpha": torch.tensor(self.alpha)}

    def load_state_dict(self, state: dict[str, Tensor], backbone: nn.Module | None = None) -> None:
        super().load_state_dict(state, backbone)
        self.alpha = float(state["alpha"])
