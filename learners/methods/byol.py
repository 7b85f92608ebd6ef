"""BYOL (Grill et al., 2020): predict a slowly moving (EMA) target network's projection."""

from __future__ import annotations

import copy

import torch
from torch import nn

from learners.losses import NegativeCosineSimilarity
from learners.methods import MethodOutput


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector/predictor: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class BYOL(nn.Module):
    """BYOL: online backbone + projector + predictor, EMA target backbone + projector.

    Args:
        backbone: the online encoder (trained; ``feature_dim`` attribute).
        hidden_dim: MLP hidden width. Default ``min(4096, 8 * feature_dim)``.
        proj_dim: projection size. Default ``min(256, feature_dim // 2)``
            (4096/256 for ResNet-18 width 64, as in the paper; 1024/64 for width 16).
        momentum: EMA rate of the target, ``target <- m * target + (1 - m) * online``.
            Constant (a stream has no known length for the paper's cosine schedule).

    The target network never receives gradients; ``after_step()`` moves it
    towards the online network and must be called after every optimizer step.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int | None = None,
        proj_dim: int | None = None,
        momentum: float = 0.99,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        feature_dim: int = backbone.feature_dim
        hidden_dim = hidden_dim or min(4096, 8 * feature_dim)
        proj_dim = proj_dim or min(256, feature_dim // 2)
        self.momentum = momentum
        self.backbone = backbone
        self.projector = _mlp(feature_dim, hidden_dim, proj_dim)
        self.predictor = _mlp(proj_dim, hidden_dim, proj_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.criterion = NegativeCosineSimilarity()

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, data_parallel: bool = False
    ) -> MethodOutput:
        """Loss and view1's features; the loss is a mean over images, so `data_parallel`
        changes nothing (DDP's gradient average already makes it the global mean)."""
        f1, f2 = self.backbone(view1), self.backbone(view2)  # (B, D) each
        p1 = self.predictor(self.projector(f1))  # (B, P)
        p2 = self.predictor(self.projector(f2))
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(view1))  # (B, P)
            t2 = self.target_projector(self.target_backbone(view2))
        loss = 0.5 * (self.criterion(p1, t2) + self.criterion(p2, t1))
        return MethodOutput(loss=loss, features=f1)

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA update of the target parameters; BN running statistics are copied."""
        pairs = ((self.target_backbone, self.backbone), (self.target_projector, self.projector))
        for target, online in pairs:
            for t, o in zip(target.parameters(), online.parameters(), strict=True):
                t.lerp_(o, 1.0 - self.momentum)
            for t, o in zip(target.buffers(), online.buffers(), strict=True):
                t.copy_(o)
