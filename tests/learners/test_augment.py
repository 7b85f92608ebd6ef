import pytest
import torch

from learners.augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment, EvalTransform

NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
QUIET = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0}  # crop only


def _image(size: int = 32) -> torch.Tensor:
    """A (3, S, S) uint8 image with distinct structure along x, y and across channels."""
    ramp = torch.linspace(0, 255, size)
    r = ramp.view(1, -1).expand(size, size)  # varies along x
    g = ramp.view(-1, 1).expand(size, size)  # varies along y
    b = (r + g) / 2
    return torch.stack([r, g, b]).round().to(torch.uint8)


def _batch(n: int, size: int = 32) -> torch.Tensor:
    return _image(size).unsqueeze(0).repeat(n, 1, 1, 1)


def test_shape_dtype_and_normalization_range():
    aug = BatchAugment(resolution=24)
    out = aug(_batch(5, 40))
    assert out.shape == (5, 3, 24, 24) and out.dtype == torch.float32
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = out.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= lo - 1e-4).all() and (per_channel.max(1).values <= hi + 1e-4).all()


def test_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment(8)(torch.rand(2, 3, 8, 8))


def test_identity_when_all_randomness_off():
    aug = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), **QUIET, **NO_NORM)
    x = _batch(2)
    torch.testing.assert_close(aug(x), x.float() / 255, atol=1e-4, rtol=0)


def test_crops_are_independent_per_image_and_smaller_than_image():
    aug = BatchAugment(16, scale=(0.2, 0.3), **QUIET, **NO_NORM)
    out = aug(_batch(8), generator=torch.Generator().manual_seed(0))
    # Every image got its own box: no two outputs are equal.
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(8) * 1e9).min() > 1e-3
    # A crop of at most 30% of the area covers a narrower x-range than the full image.
    x_span = out[:, 0].amax(dim=(1, 2)) - out[:, 0].amin(dim=(1, 2))  # red channel ramps along x
    assert (x_span < 0.8).all()


def test_flips_are_drawn_per_image():
    aug = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0,
                       grayscale_p=0.0, **NO_NORM)
    x = _batch(32)
    out = aug(x, generator=torch.Generator().manual_seed(1))
    plain, mirrored = x.float() / 255, x.float().flip(-1) / 255
    is_plain = (out - plain).abs().flatten(1).amax(1) < 1e-3
    is_mirrored = (out - mirrored).abs().flatten(1).amax(1) < 1e-3
    assert (is_plain ^ is_mirrored).all()
    assert 0 < is_mirrored.sum() < 32  # both outcomes within one batch


def test_colour_jitter_is_drawn_per_image():
    aug = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0,
                       grayscale_p=0.0, **NO_NORM)
    out = aug(_batch(6), generator=torch.Generator().manual_seed(2))
    means = out.mean(dim=(2, 3))  # (6, 3)
    assert torch.cdist(means, means).add(torch.eye(6) * 1e9).min() > 1e-4


def test_jitter_is_applied_to_a_random_subset_of_each_batch():
    aug = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.5,
                       brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0,
                       **NO_NORM)
    x = _batch(64)
    out = aug(x, generator=torch.Generator().manual_seed(4))
    changed = (out - x.float() / 255).abs().flatten(1).amax(1) > 1e-3
    assert 16 < changed.sum() < 48


def test_jitter_probability_zero_keeps_colours_and_hue_keeps_gray():
    x = _batch(4)
    crop_only = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), **QUIET, **NO_NORM)
    torch.testing.assert_close(crop_only(x), x.float() / 255, atol=1e-4, rtol=0)
    # A hue rotation leaves gray pixels gray (it only turns the chroma plane).
    hue_only = BatchAugment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0,
                            brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5,
                            grayscale_p=0.0, **NO_NORM)
    gray = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    torch.testing.assert_close(hue_only(gray), gray.float() / 255, atol=1e-4, rtol=0)


def test_grayscale_probability_per_image():
    aug = BatchAugment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                       grayscale_p=0.2, **NO_NORM)
    out = aug(_batch(2000, 8), generator=torch.Generator().manual_seed(3))
    is_gray = ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-5) & (
        (out[:, 1] - out[:, 2]).abs().amax((1, 2)) < 1e-5
    )
    assert 0.15 < is_gray.float().mean() < 0.25


def test_seeded_generator_is_deterministic():
    aug = BatchAugment(24)
    x = _batch(4)
    a = aug(x, generator=torch.Generator().manual_seed(7))
    b = aug(x, generator=torch.Generator().manual_seed(7))
    c = aug(x, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_eval_transform_resizes_and_normalizes_deterministically():
    t = EvalTransform(16)
    x = _batch(3, 32)
    out = t(x)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, t(x), rtol=0, atol=0)
    same_size = EvalTransform(32)(x)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(same_size, (x.float() / 255 - mean) / std)
