"""SimCLR (Chen et al., 2020): contrastive loss over the 2B views of a batch."""

from __future__ import annotations

import torch
from torch import nn

from learners.losses import NTXentLoss
from learners.methods import MethodOutput


class SimCLR(nn.Module):
    """SimCLR with a 2-layer projection head and the NT-Xent loss.

    Args:
        backbone: encoder with a ``feature_dim`` attribute.
        proj_dim: output of the projection head. Default ``min(128, feature_dim)``
            (128 as in the paper). The hidden layer has ``feature_dim`` units,
            as in the paper (2048 = ResNet-50's feature size).
        temperature: NT-Xent temperature (0.5, the paper's CIFAR setting).
    """

    def __init__(
        self, backbone: nn.Module, proj_dim: int | None = None, temperature: float = 0.5
    ) -> None:
        super().__init__()
        feature_dim: int = backbone.feature_dim
        proj_dim = proj_dim or min(128, feature_dim)
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, feature_dim, bias=False),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(feature_dim, proj_dim),
        )
        self.criterion = NTXentLoss(temperature=temperature)

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, data_parallel: bool = False
    ) -> MethodOutput:
        """Loss and view1's features. With `data_parallel` (a DDP training step, called on
        every rank together) the negatives are every rank's embeddings, not only this rank's."""
        f1, f2 = self.backbone(view1), self.backbone(view2)  # (B, D) each
        loss = self.criterion(self.projector(f1), self.projector(f2), gather=data_parallel)
        return MethodOutput(loss=loss, features=f1)

    def after_step(self) -> None:
        """SimCLR has no state outside the optimized parameters."""
