"""MAS: label-free importance from the features' squared norm, quadratic penalty, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learners.regularizers import MAS, build_regularizer
from tests.regularizer_testkit import penalty_of, perturb, roundtrip, tiny_net, views


def unused_loss(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("MAS must not need the SSL loss")


def ended(lam: float = 2.0, alpha: float = 0.5) -> tuple[MAS, nn.Module]:
    backbone = tiny_net()
    reg = MAS(lam, alpha=alpha)
    reg.on_experience_end(backbone, unused_loss, [views(1), views(2)])
    return reg, backbone


def test_penalty_is_zero_before_any_anchor_and_at_the_anchor():
    backbone = tiny_net()
    assert penalty_of(MAS(2.0), backbone, views()).item() == 0.0
    reg, backbone = ended()
    assert penalty_of(reg, backbone, views()).item() == 0.0


def test_importance_is_mean_abs_gradient_of_the_squared_feature_norm():
    backbone = nn.Linear(3, 2, bias=False)
    batches = [torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    reg = MAS(1.0)
    reg.on_experience_end(backbone, unused_loss, batches)
    w = backbone.weight.detach()
    # d/dW mean_b ||W x_b||^2 = 2 W (X^T X) / B
    expected = sum((2 * w @ (x.T @ x) / len(x)).abs() for x in batches) / len(batches)
    torch.testing.assert_close(reg.importance["weight"], expected)


def test_penalty_grows_quadratically_with_the_distance_and_matches_the_formula():
    reg, backbone = ended(lam=2.0)
    noise = perturb(backbone, 0.05)
    expected = sum((reg.importance[n] * (0.05 * noise[n]) ** 2).sum() for n in noise)  # lam/2 = 1
    small = penalty_of(reg, backbone, views()).item()
    assert small == pytest.approx(expected.item(), rel=1e-4) and small > 0
    perturb(backbone, 0.05)
    assert penalty_of(reg, backbone, views()).item() == pytest.approx(4 * small, rel=1e-4)


def test_importance_accumulates_with_alpha():
    backbone = tiny_net()
    reg = MAS(1.0, alpha=0.25)
    reg.on_experience_end(backbone, unused_loss, [views(1)])
    first = {n: t.clone() for n, t in reg.importance.items()}
    perturb(backbone, 0.1)
    reg.on_experience_end(backbone, unused_loss, [views(2)])
    fresh = MAS(1.0)
    fresh.on_experience_end(backbone, unused_loss, [views(2)])
    for name, omega in reg.importance.items():
        torch.testing.assert_close(omega, 0.25 * first[name] + 0.75 * fresh.importance[name])


def test_state_round_trips_through_safetensors(tmp_path):
    reg, backbone = ended(lam=2.0, alpha=0.3)
    perturb(backbone, 0.1)
    restored = MAS(1.0)
    restored.load_state_dict(roundtrip(reg, tmp_path / "r.safetensors"), backbone=backbone)
    assert (restored.penalty_weight, restored.alpha) == (2.0, pytest.approx(0.3))
    assert penalty_of(restored, backbone, views()).item() == pytest.approx(
        penalty_of(reg, backbone, views()).item(), rel=1e-6
    )


def test_built_by_name():
    assert isinstance(build_regularizer("MAS"), MAS)
