"""SimSiam (Chen & He, 2021): two views, a predictor, and a stop-gradient; no negatives."""

from __future__ import annotations

import torch
from torch import nn

from learners.losses import NegativeCosineSimilarity
from learners.methods import MethodOutput


class SimSiam(nn.Module):
    """SimSiam with the paper's 3-layer projector and 2-layer bottleneck predictor.

    Args:
        backbone: encoder with a ``feature_dim`` attribute.
        proj_dim: projector width/output. Default ``min(2048, 4 * feature_dim)``
            (2048 for ResNet-18 width 64 as in the paper; 512 for width 16).
        pred_dim: predictor bottleneck. Default ``proj_dim // 4`` (512 for 2048).

    Loss: ``0.5 * (D(p1, sg(z2)) + D(p2, sg(z1)))`` with D the negative cosine.
    """

    def __init__(
        self, backbone: nn.Module, proj_dim: int | None = None, pred_dim: int | None = None
    ) -> None:
        super().__init__()
        feature_dim: int = backbone.feature_dim
        proj_dim = proj_dim or min(2048, 4 * feature_dim)
        pred_dim = pred_dim or proj_dim // 4
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, proj_dim, bias=False),
            nn.BatchNorm1d(proj_dim),
            nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False),
            nn.BatchNorm1d(proj_dim),
            nn.ReLU(inplace=True),
            nn.Linear(proj_dim, proj_dim, bias=False),
            nn.BatchNorm1d(proj_dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(proj_dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),
            nn.Linear(pred_dim, proj_dim),
        )
        self.criterion = NegativeCosineSimilarity()

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, data_parallel: bool = False
    ) -> MethodOutput:
        """Loss and view1's features; the loss is a mean over images, so `data_parallel`
        changes nothing (DDP's gradient average already makes it the global mean)."""
        f1, f2 = self.backbone(view1), self.backbone(view2)  # (B, D) each
        z1, z2 = self.projector(f1), self.projector(f2)  # (B, P)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, P)
        loss = 0.5 * (self.criterion(p1, z2.detach()) + self.criterion(p2, z1.detach()))
        return MethodOutput(loss=loss, features=f1)

    def after_step(self) -> None:
        """SimSiam has no state outside the optimized parameters."""
