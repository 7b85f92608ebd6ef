"""The ranks' shared decisions (`deploy.world.agree`) and the one-process World."""

from __future__ import annotations

import pytest
import torch

from deploy.world import Tick, World, agree


def test_one_process_world_is_a_local_no_op():
    world = World()
    tick = Tick(records=3, images=3, stepped=4)
    assert not world.distributed and world.is_main
    assert world.exchange(tick) == [tick]
    assert world.gather("x") == ["x"]
    assert world.broadcast({"a": 1}) == {"a": 1}
    assert world.all_true(False) is False
    state = {"w": torch.ones(2)}
    assert world.average_state(state) is state
    module = torch.nn.Linear(2, 2)
    assert world.wrap(module, torch.device("cpu")) is module


def test_counts_sum_and_weights_make_ddp_mean_the_mean_over_all_images():
    agreed = agree([Tick(records=2, images=30, stepped=48), Tick(records=1, images=10, stepped=16)], "a")
    assert (agreed.records, agreed.images, agreed.stepped) == (3, 40, 64)
    weights = [agreed.weight(r, 2) for r in range(2)]
    assert weights == pytest.approx([1.5, 0.5])
    # DDP averages rank gradients: (w0*g0 + w1*g1) / 2 must equal (48*g0 + 16*g1) / 64
    assert sum(weights) / 2 == pytest.approx(1.0)


def test_a_rank_without_data_steps_at_weight_zero_and_no_data_anywhere_is_no_step():
    agreed = agree([Tick(records=1, images=8, stepped=8), Tick()], "a")
    assert agreed.weight(1, 2) == 0.0 and agreed.weight(0, 2) == 2.0
    assert agree([Tick(), Tick()], "a").weight(0, 2) == 0.0


def test_a_domain_switch_on_any_rank_ends_the_experience_once():
    first = agree([Tick(images=4, domain="a"), Tick(images=4, domain="b", changed_to="b")], current_domain="a")
    assert first.boundary_to == "b" and first.domain == "b"
    # the other rank reaches "b" later: it only catches up, no second boundary
    later = agree([Tick(images=4, domain="b", changed_to="b"), Tick(images=4, domain="b")], current_domain="b")
    assert later.boundary_to is None
    # a one-process world behaves as before: a switch away from the current domain splits
    assert agree([Tick(images=1, domain="c", changed_to="c")], current_domain="b").boundary_to == "c"


def test_stop_on_any_rank_idle_only_on_all_and_lag_merged():
    agreed = agree([Tick(stop=True, idle=True, lag={0: 5}), Tick(idle=False, lag={1: 7})], None)
    assert agreed.stop and not agreed.idle
    assert agreed.lag == {0: 5, 1: 7}
    assert agree([Tick(idle=True), Tick(idle=True, checkpoint_due=True)], None).idle
    assert agree([Tick(), Tick(checkpoint_due=True)], None).checkpoint_due
