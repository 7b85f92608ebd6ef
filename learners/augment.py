"""Batched SSL augmentation with independent randomness per image.

``torchvision.transforms.v2`` applied to a batch tensor draws ONE crop, flip
and jitter for the whole batch, which would make every image in a batch see
the same view geometry. ``BatchAugment`` instead draws one set of parameters
per image and applies them all at once with tensor ops, so it runs on the
device where the batch already is (CPU or GPU) without a Python loop:

- random resized crop: ``torchvision.ops.roi_align`` with one box per image
  (crop + resize + anti-aliasing average in one kernel);
- horizontal flip, colour jitter (brightness, contrast, saturation, hue) and
  grayscale: per-image factors broadcast over ``(B, 3, R, R)``;
- normalization with mean/std buffers.

Colour ops use a fixed order (brightness, contrast, saturation, hue) instead
of torchvision's random order, and hue is a rotation of the chroma plane in
YIQ space (a linear approximation of the HSV hue shift, much cheaper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights (the same as torchvision's rgb_to_grayscale).
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ; hue rotates the (I, Q) plane.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)


class BatchAugment(nn.Module):
    """SimSiam/BYOL/SimCLR-style augmentation of a uint8 batch, per-image random.

    Args:
        resolution: output side R.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (w / h).
        flip_p: probability of a horizontal flip.
        jitter_p: probability of applying colour jitter.
        brightness, contrast, saturation: jitter strengths s, factors drawn
            from ``U(1 - s, 1 + s)`` (as torchvision's ``ColorJitter``).
        hue: hue shift drawn from ``U(-hue, hue)`` turns (at most 0.5).
        grayscale_p: probability of converting to grayscale.
        mean, std: normalization (ImageNet by default).

    Example::

        augment = BatchAugment(resolution=32)
        images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
        view1, view2 = augment(images), augment(images)  # (64, 3, 32, 32) float32
    """

    def __init__(
        self,
        resolution: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.resolution = resolution
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.flip_p = flip_p
        self.jitter_p = jitter_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.grayscale_p = grayscale_p
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        rgb_to_yiq = torch.tensor(_RGB_TO_YIQ)
        self.register_buffer("rgb_to_yiq", rgb_to_yiq, persistent=False)
        self.register_buffer("yiq_to_rgb", torch.linalg.inv(rgb_to_yiq), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``images`` (B, 3, S, S) uint8 into one view (B, 3, R, R) float32.

        Random parameters are drawn with ``generator`` (on its device) if given,
        else with the global RNG of the images' device.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        b, device = images.shape[0], images.device
        rng_device = generator.device if generator is not None else device

        def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, device=rng_device)
            return (low + (high - low) * u).to(device)

        x = images.float().div_(255)  # (B, 3, S, S) in [0, 1]
        x = self._resized_crop(x, uniform)  # (B, 3, R, R)

        flip = uniform(b) < self.flip_p  # (B,)
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)

        # Colour jitter: images without jitter get identity factors (1, 1, 1, 0).
        jitter = (uniform(b) < self.jitter_p).float()  # (B,)

        def factor(strength: float) -> torch.Tensor:
            f = uniform(b, low=1.0 - strength, high=1.0 + strength).clamp_(min=0.0)
            return (1.0 + jitter * (f - 1.0)).view(b, 1, 1, 1)

        x = (x * factor(self.brightness)).clamp_(0.0, 1.0)
        c = factor(self.contrast)
        gray_mean = self._gray(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = (c * x + (1.0 - c) * gray_mean).clamp_(0.0, 1.0)
        s = factor(self.saturation)
        x = (s * x + (1.0 - s) * self._gray(x)).clamp_(0.0, 1.0)
        if self.hue > 0:
            turns = jitter * uniform(b, low=-self.hue, high=self.hue)  # (B,)
            x = self._hue_rotate(x, 2.0 * math.pi * turns).clamp_(0.0, 1.0)

        gray = uniform(b) < self.grayscale_p  # (B,)
        x = torch.where(gray.view(b, 1, 1, 1), self._gray(x).expand_as(x), x)
        return (x - self.mean) / self.std

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1, H, W) luma."""
        return (x * self.luma).sum(dim=1, keepdim=True)

    def _hue_rotate(self, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """Rotate the chroma (I, Q) plane of each image by its own ``angle`` (B,) radians."""
        cos, sin = torch.cos(angle), torch.sin(angle)
        one, zero = torch.ones_like(cos), torch.zeros_like(cos)
        rot = torch.stack(
            [one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1
        ).view(-1, 3, 3)  # (B, 3, 3) acting on YIQ
        m = self.yiq_to_rgb @ rot @ self.rgb_to_yiq  # (B, 3, 3) acting on RGB
        return torch.einsum("bij,bjhw->bihw", m, x)

    def _resized_crop(self, x: torch.Tensor, uniform: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Random resized crop, one box per image, as torchvision's RandomResizedCrop.

        Like torchvision, it tries 10 (area, ratio) draws per image and takes
        the first that fits inside the image; if none fits it falls back to
        the whole image. ``roi_align`` with adaptive sampling averages several
        samples per output pixel, so downscaling large crops does not alias.
        """
        b, _, h, w = x.shape
        tries = 10
        area = h * w * uniform(b, tries, low=self.scale[0], high=self.scale[1])  # (B, 10)
        ratio = torch.exp(uniform(b, tries, low=self.log_ratio[0], high=self.log_ratio[1]))
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # (B, 10)
        fits = (cw <= w) & (ch <= h)
        first = fits.int().argmax(dim=1, keepdim=True)  # first fitting try, 0 if none fits
        any_fit = fits.any(dim=1)
        cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), float(w))  # (B,)
        ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), float(h))
        x0 = uniform(b) * (w - cw)
        y0 = uniform(b) * (h - ch)
        idx = torch.arange(b, device=x.device, dtype=x.dtype)
        boxes = torch.stack([idx, x0, y0, x0 + cw, y0 + ch], dim=1)  # (B, 5)
        r = self.resolution
        return roi_align(x, boxes, output_size=(r, r), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class EvalTransform(nn.Module):
    """Deterministic view for embedding/evaluation: resize to R, normalize.

    Example::

        transform = EvalTransform(resolution=32)
        x = transform(images_u8)  # (B, 3, 32, 32) float32, normalized
    """

    def __init__(
        self,
        resolution: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, R, R) float32 normalized."""
        x = images.float().div_(255)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                align_corners=False,
            ).clamp_(0.0, 1.0)
        return (x - self.mean) / self.std
