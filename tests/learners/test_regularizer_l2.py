"""L2: uniform pull towards the previous experience's weights."""

from __future__ import annotations

import pytest

from learners.regularizers import L2, build_regularizer
from tests.regularizer_testkit import penalty_of, perturb, roundtrip, ssl_like_loss, tiny_net, views


def test_penalty_is_lambda_times_squared_distance_to_the_previous_weights():
    backbone = tiny_net()
    reg = L2(0.5)
    assert penalty_of(reg, backbone, views()).item() == 0.0
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    assert penalty_of(reg, backbone, views()).item() == 0.0
    noise = perturb(backbone, 0.1)
    expected = 0.5 * sum((0.1 * t).pow(2).sum() for t in noise.values())
    assert penalty_of(reg, backbone, views()).item() == pytest.approx(expected.item(), rel=1e-4)
    perturb(backbone, 0.1)
    assert penalty_of(reg, backbone, views()).item() == pytest.approx(4 * expected.item(), rel=1e-4)


def test_each_experience_end_moves_the_anchor():
    backbone = tiny_net()
    reg = L2(1.0)
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    perturb(backbone, 0.1)
    assert penalty_of(reg, backbone, views()).item() > 0
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    assert penalty_of(reg, backbone, views()).item() == 0.0


def test_state_round_trips_through_safetensors(tmp_path):
    backbone = tiny_net()
    reg = L2(0.5)
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    perturb(backbone, 0.1)
    restored = L2(7.0)
    restored.load_state_dict(roundtrip(reg, tmp_path / "r.safetensors"), backbone=backbone)
    assert restored.penalty_weight == 0.5 and restored.importance is None
    assert penalty_of(restored, backbone, views()).item() == pytest.approx(
        penalty_of(reg, backbone, views()).item(), rel=1e-6
    )


def test_built_by_name_with_default_lambda():
    reg = build_regularizer("l2")
    assert isinstance(reg, L2) and reg.penalty_weight > 0
