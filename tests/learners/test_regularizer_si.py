"""SI: path-integral importance accumulated during training, quadratic penalty, state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learners.regularizers import SI, build_regularizer
from tests.regularizer_testkit import penalty_of, perturb, roundtrip, ssl_like_loss, tiny_net, views


class Scalar(nn.Module):
    """One weight ``w``; ``loss = w^2 / 2`` has gradient ``w``."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), 1)


def sgd_steps(reg: SI, model: nn.Module, loss_fn, steps: int, lr: float, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(x).backward()
        reg.after_backward(model)
        optimizer.step()
        reg.after_step(model)


def test_importance_matches_the_hand_computed_path_integral():
    model = Scalar(1.0)
    reg = SI(2.0, xi=0.1)
    sgd_steps(reg, model, lambda x: model.w.pow(2).sum() / 2, steps=2, lr=0.5, x=torch.zeros(1))
    # w: 1 -> 0.5 -> 0.25; omega = 1*0.5 + 0.5*0.25 = 0.625; Delta = -0.75
    assert model.w.item() == 0.25 and reg.omega["w"].item() == pytest.approx(0.625)
    assert penalty_of(reg, model, torch.zeros(1)).item() == 0.0  # no anchor yet
    reg.on_experience_end(model, ssl_like_loss(model), [])
    omega_big = 0.625 / (0.75**2 + 0.1)
    assert reg.importance["w"].item() == pytest.approx(omega_big)
    assert penalty_of(reg, model, torch.zeros(1)).item() == 0.0  # at the anchor
    with torch.no_grad():
        model.w += 1.0
    assert penalty_of(reg, model, torch.zeros(1)).item() == pytest.approx(2.0 * omega_big)
    assert reg.omega == {}  # restarts for the next experience


def test_nothing_accumulates_when_the_parameters_do_not_move():
    backbone = tiny_net()
    reg = SI(1.0)
    sgd_steps(reg, backbone, ssl_like_loss(backbone), steps=3, lr=0.0, x=views())
    assert all((omega == 0).all() for omega in reg.omega.values())
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    perturb(backbone, 0.1)
    assert penalty_of(reg, backbone, views()).item() == 0.0


def test_training_accumulates_and_the_penalty_grows_with_the_distance():
    backbone = tiny_net()
    reg = SI(1.0)
    sgd_steps(reg, backbone, ssl_like_loss(backbone), steps=3, lr=0.1, x=views())
    assert sum(omega.abs().sum() for omega in reg.omega.values()) > 0
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    assert all((omega >= 0).all() for omega in reg.importance.values())
    perturb(backbone, 0.05)
    small = penalty_of(reg, backbone, views()).item()
    perturb(backbone, 0.05)
    assert small > 0 and penalty_of(reg, backbone, views()).item() == pytest.approx(
        4 * small, rel=1e-4
    )


@pytest.mark.parametrize("anchored", [False, True])
def test_mid_experience_state_round_trips_through_safetensors(tmp_path, anchored):
    backbone = tiny_net()
    reg = SI(1.5, xi=0.2)
    if anchored:
        sgd_steps(reg, backbone, ssl_like_loss(backbone), steps=2, lr=0.1, x=views())
        reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    sgd_steps(reg, backbone, ssl_like_loss(backbone), steps=2, lr=0.1, x=views(3))
    restored = SI(1.0)
    restored.load_state_dict(roundtrip(reg, tmp_path / "r.safetensors"), backbone=backbone)
    assert (restored.penalty_weight, restored.xi) == (1.5, pytest.approx(0.2))
    assert penalty_of(restored, backbone, views()).item() == pytest.approx(
        penalty_of(reg, backbone, views()).item(), rel=1e-6
    )
    for name, omega in reg.omega.items():  # the running path integral survives a restart
        torch.testing.assert_close(restored.omega[name], omega)
    perturb(backbone, 0.01)  # Delta is measured from the experience's start, restored too
    reg.on_experience_end(backbone, ssl_like_loss(backbone), [])
    restored.on_experience_end(backbone, ssl_like_loss(backbone), [])
    for name, omega in reg.importance.items():
        torch.testing.assert_close(restored.importance[name], omega)


def test_built_by_name():
    reg = build_regularizer("si", lam=0.5, xi=1.0)
    assert isinstance(reg, SI) and (reg.penalty_weight, reg.xi) == (0.5, 1.0)
