"""Image encoders (backbones) trained by the SSL methods.

A backbone maps a normalized image batch ``(B, 3, H, W)`` to one feature
vector per image ``(B, feature_dim)``. It carries no head: projection and
prediction heads belong to the SSL method, so a snapshot is the backbone
alone and loads with plain ``load_state_dict``.

``ResNet18`` is built from torchvision's own ``BasicBlock`` and keeps
torchvision's parameter names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``),
so ``ResNet18()`` (width 64, ImageNet stem) accepts the weights of
``torchvision.models.resnet18`` minus its ``fc`` layer, and vice versa.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class ResNet18(nn.Module):
    """ResNet-18 feature extractor with a configurable width and stem.

    Args:
        width: channels of the first stage; the four stages have
            ``width * (1, 2, 4, 8)`` channels (torchvision's ResNet-18 is 64).
        small_stem: CIFAR-style stem (one 3x3 conv of stride ``stem_stride``,
            no max-pool) for small images; otherwise the ImageNet stem
            (7x7 conv stride 2 + 3x3 max-pool stride 2).
        stem_stride: stride of the small stem's conv (1 keeps full
            resolution; 2 quarters the compute of every later layer).
            Only meaningful with ``small_stem=True``.

    ``forward(x)`` takes ``(B, 3, H, W)`` float and returns ``(B, 8 * width)``.
    ``config()`` returns the constructor kwargs so a manifest can rebuild it.
    """

    def __init__(self, width: int = 64, small_stem: bool = False, stem_stride: int = 1) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if not small_stem and stem_stride != 1:
            raise ValueError("stem_stride applies to the small stem only (small_stem=True)")
        self.width = width
        self.small_stem = small_stem
        self.stem_stride = stem_stride
        self.feature_dim = 8 * width

        if small_stem:
            self.conv1 = nn.Conv2d(3, width, 3, stride=stem_stride, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        self.layer1 = _stage(width, width, stride=1)
        self.layer2 = _stage(width, 2 * width, stride=2)
        self.layer3 = _stage(2 * width, 4 * width, stride=2)
        self.layer4 = _stage(4 * width, 8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        # Same initialization as torchvision's ResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, H/s, W/s)
        x = self.layer1(x)  # (B, w, ., .)
        x = self.layer2(x)  # (B, 2w, ., .)
        x = self.layer3(x)  # (B, 4w, ., .)
        x = self.layer4(x)  # (B, 8w, h, w')
        return torch.flatten(self.avgpool(x), 1)  # (B, 8w)

    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able): ``ResNet18(**m.config())`` rebuilds the shape."""
        return {"width": self.width, "small_stem": self.small_stem, "stem_stride": self.stem_stride}


def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Two ``BasicBlock``s; the first one changes width/resolution (1x1 conv shortcut)."""
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
        )
    return nn.Sequential(
        BasicBlock(in_ch, out_ch, stride=stride, downsample=downsample),
        BasicBlock(out_ch, out_ch),
    )


BACKBONES: dict[str, type[nn.Module]] = {"resnet18": ResNet18}


def build_backbone(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a registered backbone by name, e.g. ``build_backbone("resnet18", {"width": 16})``."""
    try:
        cls = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None
    return cls(**kwargs)
