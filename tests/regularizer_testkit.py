"""Shared helpers for the regularizer tests: a tiny conv net and a safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from learners.regularizers import Regularizer

FEATURE_DIM = 16


class TinyNet(nn.Module):
    """Two convs (with a BatchNorm, like the real backbones) -> (B, 16) features."""

    feature_dim = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, FEATURE_DIM, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def views(seed: int = 1, batch: int = 8, size: int = 16) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ssl_like_loss(backbone: nn.Module):
    """A label-free loss of a view batch: agreement of the views with their mirror images."""

    def loss(x: Tensor) -> Tensor:
        a, b = backbone(x), backbone(x.flip(-1))
        return -nn.functional.cosine_similarity(a, b, dim=1).mean() + a.pow(2).mean()

    return loss


def perturb(backbone: nn.Module, scale: float, seed: int = 2) -> dict[str, Tensor]:
    """Add ``scale * noise`` to every parameter; returns the noise by name."""
    gen = torch.Generator().manual_seed(seed)
    noise = {n: torch.randn(p.shape, generator=gen) for n, p in backbone.named_parameters()}
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            p.add_(scale * noise[n])
    return noise


def penalty_of(reg: Regularizer, backbone: nn.Module, x: Tensor) -> Tensor:
    return reg.penalty(backbone, x, backbone(x))


def roundtrip(reg: Regularizer, path: Path) -> dict[str, Tensor]:
    """Save ``reg.state_dict()`` to a safetensors file and load it back."""
    save_file(reg.state_dict(), str(path))
    return load_file(str(path))
