"""Image encoders (backbones) trained by the SSL methods.

A backbone maps a normalized image batch ``(B, 3, H, W)`` to one feature
vector per image ``(B, feature_dim)``. It carries no head: projection and
prediction heads belong to the SSL method, so a snapshot is the backbone
alone and loads with plain ``load_state_dict``.

``ResNet18`` is built from torchvision's own ``BasicBlock`` and keeps
torchvision's parameter names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``),
so ``ResNet18()`` (width 64, ImageNet stem) accepts the weights of
``torchvision.models.resnet18`` minus its ``fc`` layer, and vice versa.

The other registered backbones are torchvision's own classes with the
classification head replaced by ``nn.Identity`` (``ResNet34``/``ResNet50``:
``fc``; ``ConvNeXtTiny``: the last ``Linear`` of ``classifier``, its
LayerNorm stays; ``ViT``: ``heads``), so their state dicts are torchvision's
minus the head and a snapshot loads into e.g. ``torchvision.models.resnet50()``
whose ``fc`` is set to ``nn.Identity()``. Every backbone has ``feature_dim``
and ``config()`` (the kwargs that rebuild it); ``BACKBONES`` maps the names a
manifest or ``TAILORD_BACKBONE`` may use to the classes (one class per name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer


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


class _TorchvisionResNet(ResNet):
    """torchvision's ResNet without ``fc`` (``nn.Identity``), optionally with the small-image stem.

    Args:
        small_stem: CIFAR-style stem (3x3 conv of stride ``stem_stride``, no max-pool)
            instead of the ImageNet one (7x7 stride 2 + max-pool); same parameter names,
            only ``conv1``'s kernel differs.
        stem_stride: stride of the small stem's conv (1 or 2).
    """

    _block: type[nn.Module]
    _layers: list[int]

    def __init__(self, small_stem: bool = False, stem_stride: int = 1) -> None:
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if not small_stem and stem_stride != 1:
            raise ValueError("stem_stride applies to the small stem only (small_stem=True)")
        super().__init__(self._block, self._layers)  # torchvision's init (kaiming conv, unit BN)
        self.small_stem = small_stem
        self.stem_stride = stem_stride
        self.feature_dim: int = self.fc.in_features
        self.fc = nn.Identity()
        if small_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=stem_stride, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()

    def config(self) -> dict[str, Any]:
        return {"small_stem": self.small_stem, "stem_stride": self.stem_stride}


class ResNet34(_TorchvisionResNet):
    """``torchvision.models.resnet34`` minus ``fc``: 512-d features."""

    _block, _layers = BasicBlock, [3, 4, 6, 3]


class ResNet50(_TorchvisionResNet):
    """``torchvision.models.resnet50`` minus ``fc``: 2048-d features."""

    _block, _layers = Bottleneck, [3, 4, 6, 3]


class ConvNeXtTiny(ConvNeXt):
    """``torchvision.models.convnext_tiny`` minus its last Linear: 768-d features.

    The classifier's LayerNorm and Flatten stay (``classifier.0``), as in the model's
    own features before the head. Its 4x4 stride-4 stem leaves 1x1 maps at 32 px.
    """

    def __init__(self, stochastic_depth_prob: float = 0.1) -> None:
        blocks = [CNBlockConfig(96, 192, 3), CNBlockConfig(192, 384, 3), CNBlockConfig(384, 768, 9),
                  CNBlockConfig(768, None, 3)]
        super().__init__(blocks, stochastic_depth_prob=stochastic_depth_prob)
        self.stochastic_depth_prob = stochastic_depth_prob
        self.feature_dim: int = self.classifier[2].in_features
        self.classifier[2] = nn.Identity()

    def config(self) -> dict[str, Any]:
        return {"stochastic_depth_prob": self.stochastic_depth_prob}


class ViT(VisionTransformer):
    """torchvision's ``VisionTransformer`` minus ``heads``: the class token, ``hidden_dim``-d.

    The defaults are a tiny ViT for 32 px images (patch 4, 6 layers, 3 heads, 192-d);
    ViT-B/16 at 224 px is ``ViT(224, 16, 12, 12, 768, 3072)``. Inputs must be
    ``image_size`` pixels square.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, num_layers: int = 6, num_heads: int = 3,
                 hidden_dim: int = 192, mlp_dim: int = 768) -> None:
        super().__init__(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
        self.feature_dim: int = hidden_dim
        self.heads = nn.Identity()

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "patch_size": self.patch_size,
                "num_layers": len(self.encoder.layers), "num_heads": self.encoder.layers[0].num_heads,
                "hidden_dim": self.hidden_dim, "mlp_dim": self.mlp_dim}


BACKBONES: dict[str, type[nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "convnext_tiny": ConvNeXtTiny,
    "vit": ViT,
}

# Key prefixes of classification heads in torchvision checkpoints (dropped from starting weights).
HEAD_PREFIXES = ("fc.", "heads.", "classifier.")


def build_backbone(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a registered backbone by name, e.g. ``build_backbone("resnet18", {"width": 16})``.

    ``ValueError`` (one line) for an unknown name or kwargs the backbone does not take.
    """
    try:
        cls = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:  # unknown or missing kwargs
        raise ValueError(f"backbone {name!r}: {exc}") from None


def input_defaults(name: str, resolution: int) -> dict[str, Any]:
    """Kwargs fitting a backbone to ``resolution`` px inputs when no preset names them.

    ResNets take the small stem at 64 px and below; the ViT's ``image_size`` is the
    resolution (patch 4 up to 64 px, else 16).
    """
    if name in ("resnet18", "resnet34", "resnet50"):
        return {"small_stem": resolution <= 64}
    if name == "vit":
        return {"image_size": resolution, "patch_size": 4 if resolution <= 64 else 16}
    return {}
