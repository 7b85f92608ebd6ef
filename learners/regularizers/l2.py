"""L2: a plain pull towards the weights at the previous experience end.

Usage::

    reg = L2(lam=0.01)
    loss = ssl_loss + reg.penalty(backbone, views, features)
    loss.backward(); optimizer.step()
    reg.on_experience_end(backbone, loss_fn, batches)  # only re-anchors

References: the uniform-importance L2 baseline of Kirkpatrick et al. 2017 (EWC).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from learners.regularizers.base import LossFn, QuadraticRegularizer


class L2(QuadraticRegularizer):
    """``lam * sum (theta - theta_prev)^2``, re-anchored at every experience end."""

    def on_experience_end(self, backbone: nn.Module, loss_fn: LossFn, batches: Iterable[Tensor]) -> None:
        self.set_anchor(backbone)
