"""Online EWC: Fisher from label-free loss gradients, quadratic penalty, safetensors state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learners.regularizers import OnlineEWC, build_regularizer
from tests.regularizer_testkit import (
    penalty_of,
    perturb,
    roundtrip,
    ssl_like_loss,
    tiny_net,
    views,
)


def ended(lam: float = 3.0, gamma: float = 0.9) -> tuple[OnlineEWC, nn.Module]:
    backbone = tiny_net()
    reg = OnlineEWC(lam, gamma=gamma)
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [views(1), views(2)])
    return reg, backbone


def test_penalty_is_zero_before_any_anchor_and_at_the_anchor():
    backbone = tiny_net()
    reg = OnlineEWC(3.0)
    assert penalty_of(reg, backbone, views()).item() == 0.0
    reg, backbone = ended()
    assert penalty_of(reg, backbone, views()).item() == 0.0


def test_penalty_is_half_lambda_fisher_weighted_squared_distance():
    reg, backbone = ended(lam=3.0)
    noise = perturb(backbone, 0.1)
    expected = sum(1.5 * (reg.importance[n] * (0.1 * noise[n]) ** 2).sum() for n in noise)
    small = penalty_of(reg, backbone, views())
    assert small.item() == pytest.approx(expected.item(), rel=1e-4)
    perturb(backbone, 0.1)  # same noise again: twice the distance, four times the penalty
    assert penalty_of(reg, backbone, views()).item() == pytest.approx(4 * small.item(), rel=1e-4)


def test_penalty_gradient_reaches_the_backbone():
    reg, backbone = ended()
    perturb(backbone, 0.1)
    penalty_of(reg, backbone, views()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


def test_fisher_is_the_mean_squared_gradient_and_zero_where_the_loss_does_not_depend():
    backbone = nn.Linear(4, 2)
    batches = [torch.randn(5, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]

    def loss_fn(x: torch.Tensor) -> torch.Tensor:  # only output 0 matters
        return backbone(x)[:, 0].pow(2).mean()

    reg = OnlineEWC(1.0)
    reg.on_experience_end(backbone, loss_fn, iter(batches))
    expected = torch.zeros(2, 4)
    for x in batches:
        out0 = x @ backbone.weight[0].detach() + backbone.bias[0].detach()
        expected[0] += ((2 * out0[:, None] * x).mean(0)) ** 2 / len(batches)
    torch.testing.assert_close(reg.importance["weight"], expected)
    assert (reg.importance["weight"][0] > 0).all() and (reg.importance["weight"][1] == 0).all()
    assert backbone.weight.grad is None  # Fisher estimation leaves .grad alone


def test_online_accumulation_decays_the_old_fisher_by_gamma():
    backbone = tiny_net()
    loss_fn = ssl_like_loss(backbone)
    reg = OnlineEWC(1.0, gamma=0.5)
    reg.on_experience_end(backbone, loss_fn, [views(1)])
    first = {n: t.clone() for n, t in reg.importance.items()}
    perturb(backbone, 0.1)
    reg.on_experience_end(backbone, loss_fn, [views(2)])
    fresh = OnlineEWC(1.0)
    fresh.on_experience_end(backbone, loss_fn, [views(2)])
    for name, fisher in reg.importance.items():
        torch.testing.assert_close(fisher, 0.5 * first[name] + fresh.importance[name])
        assert (fisher >= 0).all()
    assert penalty_of(reg, backbone, views()).item() == 0.0  # re-anchored


def test_state_round_trips_through_safetensors(tmp_path):
    reg, backbone = ended(lam=3.0, gamma=0.7)
    perturb(backbone, 0.1)
    state = roundtrip(reg, tmp_path / "regularizer.safetensors")
    restored = OnlineEWC(99.0, gamma=0.1)
    restored.load_state_dict(state, backbone=backbone)
    assert (restored.penalty_weight, restored.gamma) == (3.0, pytest.approx(0.7))
    assert penalty_of(restored, backbone, views()).item() == pytest.approx(
        penalty_of(reg, backbone, views()).item(), rel=1e-6
    )


def test_fresh_state_round_trips_to_no_anchor(tmp_path):
    backbone = tiny_net()
    restored = OnlineEWC(1.0)
    restored.load_state_dict(roundtrip(OnlineEWC(2.0), tmp_path / "r.safetensors"), backbone)
    assert penalty_of(restored, backbone, views()).item() == 0.0


def test_built_by_name():
    reg = build_regularizer("ewc", lam=5.0, gamma=0.3)
    assert isinstance(reg, OnlineEWC) and (reg.penalty_weight, reg.gamma) == (5.0, 0.3)
