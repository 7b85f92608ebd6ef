"""CaSSLe-style predictive distillation: current features must still predict the old encoder's.

Usage::

    reg = Distill(lam=1.0, feature_dim=512)
    optimizer = SGD([*method.parameters(), *reg.parameters()], lr=0.05)
    loss = ssl_loss + reg.penalty(backbone, views, features)
    loss.backward(); optimizer.step()
    reg.on_experience_end(backbone, loss_fn, batches)  # freezes a copy of backbone
    # restart: reg.load_state_dict(load_file("regularizer.safetensors"), backbone=backbone)

References: Fini et al. 2022 (Self-Supervised Models are Continual Learners, CaSSLe).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learners.regularizers.base import LossFn, Regularizer, device_of, prefixed, with_prefix


class ResidualPredictor(nn.Module):
    """``f + MLP(f)`` (D -> D/4 -> D) whose last layer starts at zero, i.e. the identity."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, dim),
        )
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Zero the last layer in place (same Parameter objects, so optimizers keep them)."""
        with torch.no_grad():
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return features + self.mlp(features)


class Distill(Regularizer):
    """``lam * mean_b max(0, 1 - cos(predictor(f_b), prev(views_b)))``; 0 before the first experience end.

    ``prev`` is a frozen copy of the backbone taken at the last experience end (no
    grads; its normalization layers never update their running statistics and
    follow the live backbone's train/eval mode, so at the anchor weights the
    target equals the current features). The predictor is residual and reset to
    the identity at each experience end, so the penalty is 0 at the new anchor.

    ``state_dict`` holds ``prev.*`` (frozen encoder) and ``predictor.*``; rebuilding
    ``prev`` needs a model of the same class, hence
    ``load_state_dict(state, backbone=current_backbone)``. Pass the plain module
    (not a DDP or ``torch.compile`` wrapper): it is deep-copied.
    Unlike CaSSLe's BatchNorm MLP, the predictor uses LayerNorm (any batch size).
    """

    def __init__(self, lam: float, feature_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__(lam)
        self.predictor = ResidualPredictor(feature_dim, hidden_dim or max(feature_dim // 4, 1))
        self.prev: nn.Module | None = None

    def parameters(self) -> list[nn.Parameter]:
        return list(self.predictor.parameters())

    def to(self, device: torch.device | str) -> Distill:
        self.predictor.to(device)
        if self.prev is not None:
            self.prev.to(device)
        return self

    def penalty(self, backbone: nn.Module, views: Tensor, features: Tensor) -> Tensor:
        if self.prev is None:
            return features.new_zeros((), dtype=torch.float32)
        if self.predictor.mlp[0].weight.device != features.device:
            self.predictor.to(features.device)  # in place: the optimizer's Parameters stay valid
        self.prev.train(backbone.training)
        with torch.no_grad():
            target = self.prev(views).float()
        predicted = self.predictor(features.float()).float()
        # float32 rounding can put cos a few ulps above 1: clamp each term so the penalty the
        # loss adds (and the one reported) is never negative
        distance = (1.0 - F.cosine_similarity(predicted, target, dim=1)).clamp_min(0.0)  # (B,)
        return self.penalty_weight * distance.mean()

    def on_experience_end(self, backbone: nn.Module, loss_fn: LossFn, batches: Iterable[Tensor]) -> None:
        self.prev = _frozen_copy(backbone)
        self.predictor.reset_to_identity()

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        state.update(prefixed("predictor.", self.predictor.state_dict()))
        if self.prev is not None:
            state.update(prefixed("prev.", self.prev.state_dict()))
        return state

    def load_state_dict(self, state: dict[str, Tensor], backbone: nn.Module | None = None) -> None:
        super().load_state_dict(state, backbone)
        device = device_of(backbone)
        if device is not None:
            self.predictor.to(device)
        self.predictor.load_state_dict(with_prefix(state, "predictor."))
        prev_state = with_prefix(state, "prev.")
        if not prev_state:
            self.prev = None
            return
        if backbone is None:
            raise ValueError(
                "Distill.load_state_dict needs backbone= to rebuild the frozen encoder"
            )
        self.prev = _frozen_copy(backbone)
        self.prev.load_state_dict(prev_state)


def _frozen_copy(backbone: nn.Module) -> nn.Module:
    """A deep copy without grads whose normalization layers never update running stats."""
    frozen = copy.deepcopy(backbone)
    for p in frozen.parameters():
        p.requires_grad_(False)
        p.grad = None
    for m in frozen.modules():
        if hasattr(m, "track_running_stats"):
            m.track_running_stats = False
    return frozen
