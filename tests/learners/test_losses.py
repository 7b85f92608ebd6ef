import math

import pytest
import torch
import torch.nn.functional as F

from learners.losses import NegativeCosineSimilarity, NTXentLoss


def test_negative_cosine_hand_values():
    loss = NegativeCosineSimilarity()
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert loss(e1, e1).item() == pytest.approx(-1.0)
    assert loss(e1, e2).item() == pytest.approx(0.0)
    assert loss(e1, -3 * e1).item() == pytest.approx(1.0)
    x0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    x1 = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert loss(x0, x1).item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2)


def test_ntxent_hand_values():
    loss = NTXentLoss(temperature=0.5)
    eye = torch.eye(2)
    # Positives identical, the other pair orthogonal: -log(e^2 / (e^2 + 2)) per anchor.
    assert loss(eye, eye).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)))
    # Positives orthogonal, one negative identical: -log(1 / (1 + 1 + e^2)).
    assert loss(eye, eye.flip(0)).item() == pytest.approx(math.log(2 + math.exp(2)))


def test_ntxent_matches_loop_reference():
    torch.manual_seed(0)
    z0, z1 = torch.randn(5, 7), torch.randn(5, 7)
    t = 0.3
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = len(z)
    total = 0.0
    for a in range(n):
        pos = (a + 5) % n
        denom = sum(math.exp(float(z[a] @ z[k]) / t) for k in range(n) if k != a)
        total += -math.log(math.exp(float(z[a] @ z[pos]) / t) / denom)
    assert NTXentLoss(temperature=t)(z0, z1).item() == pytest.approx(total / n, rel=1e-5)


def test_losses_compute_in_float32_and_backprop():
    z0 = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    z1 = torch.randn(4, 8, dtype=torch.bfloat16)
    for loss in (NegativeCosineSimilarity()(z0, z1), NTXentLoss()(z0, z1)):
        assert loss.dtype == torch.float32 and loss.dim() == 0
        loss.backward()
    assert z0.grad is not None and torch.isfinite(z0.grad.float()).all()


def test_ntxent_rejects_bad_temperature():
    with pytest.raises(ValueError):
        NTXentLoss(temperature=0.0)


def test_ntxent_gather_is_a_no_op_in_one_process():
    z0, z1 = torch.randn(5, 8), torch.randn(5, 8)  # no process group: this rank is the world
    assert NTXentLoss()(z0, z1, gather=True).item() == NTXentLoss()(z0, z1).item()
