"""Strategy names -> (replay?, regularizer name) -> regularizer; all of them on CUDA."""

from __future__ import annotations

import pytest
import torch

from learners.regularizers import (
    REGULARIZERS,
    STRATEGIES,
    Regularizer,
    build_regularizer,
    parse_strategy,
)
from tests.regularizer_testkit import (
    FEATURE_DIM,
    penalty_of,
    perturb,
    roundtrip,
    ssl_like_loss,
    tiny_net,
    views,
)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("naive", (False, None)),
        ("replay", (True, None)),
        ("ewc", (False, "ewc")),
        ("replay+distill", (True, "distill")),
        (" Replay+SI ", (True, "si")),
    ],
)
def test_parse_strategy(strategy, expected):
    assert parse_strategy(strategy) == expected


@pytest.mark.parametrize("bad", ["", "replay+", "ewc+replay", "replay+ewc+mas", "lwf", "naive+ewc"])
def test_unknown_strategies_are_rejected_with_the_allowed_names(bad):
    with pytest.raises(ValueError, match="allowed: naive, replay, ewc"):
        parse_strategy(bad)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_builds(strategy):
    _, name = parse_strategy(strategy)
    reg = build_regularizer(name or strategy, None, feature_dim=8)  # as the daemon calls it
    assert reg is None if name is None else isinstance(reg, Regularizer)


def test_distill_needs_the_feature_dim():
    with pytest.raises(ValueError, match="feature_dim"):
        build_regularizer("distill")


def test_unknown_regularizer_name_is_rejected():
    with pytest.raises(ValueError, match="allowed: naive, replay, ewc, mas, si, l2, distill"):
        build_regularizer("lwf")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_every_regularizer_through_the_train_step_hooks_and_a_restart(name, device, tmp_path):
    """The daemon's sequence: channels_last weights, autocast on CUDA, two experiences, restart."""
    backbone = tiny_net().to(device, memory_format=torch.channels_last)
    reg = build_regularizer(name, lam=1.0, feature_dim=FEATURE_DIM).to(device)
    optimizer = torch.optim.SGD([*backbone.parameters(), *reg.parameters()], lr=0.05)
    loss_fn = ssl_like_loss(backbone)
    x = views().to(device)
    for _experience in range(2):
        for _ in range(2):
            optimizer.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                features = backbone(x)
                penalty = reg.penalty(backbone, x, features)
                loss = loss_fn(x) + penalty
            assert penalty.dtype == torch.float32 and penalty.device.type == device
            loss.backward()
            reg.after_backward(backbone)
            optimizer.step()
            reg.after_step(backbone)
        reg.on_experience_end(backbone, loss_fn, [x, views(5).to(device)])
        assert penalty_of(reg, backbone, x).item() == pytest.approx(0.0, abs=1e-5)
    perturb(backbone.cpu(), 0.05)
    backbone.to(device)
    restored = build_regularizer(name, feature_dim=FEATURE_DIM)
    restored.load_state_dict(roundtrip(reg, tmp_path / "r.safetensors"), backbone=backbone)
    expected = penalty_of(reg, backbone, x).item()
    assert expected > 0
    assert penalty_of(restored, backbone, x).item() == pytest.approx(expected, rel=1e-4)
