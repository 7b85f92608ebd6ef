"""ComputeBudget: the indexer's share of training seconds, lifted while the training loop rests."""

from __future__ import annotations

import pytest

from deploy.index_budget import ComputeBudget


def test_share_of_training_seconds_bounds_the_charged_seconds():
    budget = ComputeBudget(0.10, burst_s=0.5)
    budget.trained(10.0)  # allowance: 0.1 x 10 + 0.5 = 1.5 s
    assert budget.allows()
    budget.spent("embed", 1.0)
    assert budget.allows()
    budget.spent("refresh", 0.6)
    assert not budget.allows()  # 1.6 charged > 1.5
    budget.trained(1.0)  # allowance 1.6: still not below it
    assert not budget.allows()
    budget.trained(1.0)
    assert budget.allows()
    assert budget.seconds == {"embed": 1.0, "refresh": 0.6}
    assert budget.used_share == pytest.approx(1.6 / 12.0)


def test_a_resting_loop_lifts_the_budget_and_is_not_charged():
    budget = ComputeBudget(0.10, burst_s=0.0)
    assert budget.resting and budget.allows()  # no step yet
    budget.spent("refresh", 5.0)
    assert budget.used_share == 0.0  # nothing charged before training
    budget.trained(1.0)
    budget.spent("embed", 1.0)
    assert not budget.allows()
    budget.rest()
    assert budget.allows()
    budget.spent("embed", 3.0)  # free cores: counted, not charged
    assert budget.seconds == {"embed": 4.0, "refresh": 5.0}
    assert budget.used_share == pytest.approx(1.0)
    budget.trained(0.1)  # training again: the charge is back
    assert not budget.allows()


def test_unbounded_and_bad_shares():
    budget = ComputeBudget(None)
    budget.trained(1.0)
    budget.spent("embed", 100.0)
    assert budget.allows()
    for share in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="share"):
            ComputeBudget(share)
