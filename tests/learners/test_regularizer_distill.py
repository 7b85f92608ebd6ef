"""Distill: predictive distillation towards a frozen copy taken at the experience end."""

from __future__ import annotations

import pytest
import torch

from learners.regularizers import Distill, build_regularizer
from tests.regularizer_testkit import (
    FEATURE_DIM,
    penalty_of,
    perturb,
    roundtrip,
    ssl_like_loss,
    tiny_net,
    views,
)


def ended(lam: float = 2.0) -> tuple[Distill, torch.nn.Module]:
    backbone = tiny_net()
    reg = Distill(lam, feature_dim=FEATURE_DIM)
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    return reg, backbone


def test_penalty_is_zero_before_the_first_experience_end():
    backbone = tiny_net()
    reg = Distill(2.0, feature_dim=FEATURE_DIM)
    assert reg.prev is None and penalty_of(reg, backbone, views()).item() == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_penalty_is_zero_at_the_anchor_in_train_and_eval_mode(training):
    reg, backbone = ended()
    backbone.train(training)
    assert penalty_of(reg, backbone, views()).item() == pytest.approx(0.0, abs=1e-6)


def test_penalty_grows_when_weights_move():
    reg, backbone = ended()
    perturb(backbone, 0.05)
    small = penalty_of(reg, backbone, views()).item()
    perturb(backbone, 0.5)
    assert 0 < small < penalty_of(reg, backbone, views()).item() <= 2.0 * 2


def test_predictor_and_backbone_get_grads_but_the_frozen_copy_does_not():
    reg, backbone = ended()
    optimizer = torch.optim.SGD([*backbone.parameters(), *reg.parameters()], lr=0.1)
    perturb(backbone, 0.1)
    running_mean = reg.prev.body[1].running_mean.clone()
    for _ in range(2):  # the zero-initialized last layer lets grads reach the first after a step
        optimizer.zero_grad()
        penalty_of(reg, backbone, views()).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
        optimizer.step()
    assert reg.parameters() and all(p.grad.abs().sum() > 0 for p in reg.parameters())
    assert all(not p.requires_grad and p.grad is None for p in reg.prev.parameters())
    torch.testing.assert_close(reg.prev.body[1].running_mean, running_mean)


def test_each_experience_end_refreezes_and_resets_the_predictor_in_place():
    reg, backbone = ended()
    params = reg.parameters()
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    perturb(backbone, 0.1)
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    assert reg.parameters() == params  # same objects: an optimizer holding them stays valid
    assert penalty_of(reg, backbone, views()).item() == pytest.approx(0.0, abs=1e-6)


def test_state_round_trips_through_safetensors_with_the_backbone_as_template(tmp_path):
    reg, backbone = ended(lam=2.0)
    with torch.no_grad():
        for p in reg.parameters():
            p.add_(0.05)  # a trained predictor
    perturb(backbone, 0.1)
    state = roundtrip(reg, tmp_path / "regularizer.safetensors")
    assert any(k.startswith("prev.") for k in state) and any(
        k.startswith("predictor.") for k in state
    )
    restored = Distill(9.0, feature_dim=FEATURE_DIM)
    with pytest.raises(ValueError, match="backbone"):
        restored.load_state_dict(state)
    restored.load_state_dict(state, backbone=backbone)
    assert restored.penalty_weight == 2.0
    assert penalty_of(restored, backbone, views()).item() == pytest.approx(
        penalty_of(reg, backbone, views()).item(), rel=1e-5
    )


def test_built_by_name_needs_the_feature_dim():
    reg = build_regularizer("distill", feature_dim=FEATURE_DIM)
    assert isinstance(reg, Distill) and len(reg.parameters()) > 0


class Rows(torch.nn.Module):
    """A parameter-free "backbone" whose features are its input rows: (B, D) -> (B, D)."""

    feature_dim = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_penalty_is_never_negative_even_where_cosine_rounds_above_one():
    # float32 gives cos(x, x) > 1 for some of these rows, so a plain mean of (1 - cos) is < 0
    rows = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert (torch.nn.functional.cosine_similarity(rows, rows, dim=1) > 1).any()
    reg = Distill(2.0, feature_dim=32)
    reg.on_experience_end(Rows(), lambda v: v.sum(), [])
    penalty = reg.penalty(Rows(), rows, rows)  # at the anchor: predicted == target exactly
    assert penalty.item() >= 0.0
    assert penalty.item() == pytest.approx(0.0, abs=1e-6)
