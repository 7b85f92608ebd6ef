"""deploy.snapshots.label_switch: labels overturn the routing vote only by a significant and
sizeable gain in leave-one-out kNN accuracy on the labelled targets."""

import torch

from deploy.snapshots import LABEL_SWITCH_GAIN, LABEL_SWITCH_Z, label_switch


def right(n: int, first: int) -> torch.Tensor:
    """(n,) bool: the first `first` rows right."""
    return torch.arange(n) < first


def test_a_dead_top_vote_is_overturned() -> None:
    candidates = [{"experience": 2}, {"experience": 1}]
    assert label_switch(candidates, {2: right(8, 0), 1: right(8, 8)}) == 1
    assert candidates[1]["z_over_top_vote"] >= LABEL_SWITCH_Z


def test_significant_but_small_gain_keeps_the_vote() -> None:
    """400 labels, 12 more right: McNemar z 3.5, but 3 points of accuracy."""
    candidates = [{"experience": 4}, {"experience": 2}]
    assert label_switch(candidates, {4: right(400, 300), 2: right(400, 312)}) == 4
    assert candidates[1]["z_over_top_vote"] > LABEL_SWITCH_Z and LABEL_SWITCH_GAIN > 12 / 400


def test_a_large_but_lucky_gain_keeps_the_vote() -> None:
    """10 labels, 2 more right: 20 points, but z 1.4 is what luck gives."""
    assert label_switch([{"experience": 1}, {"experience": 3}], {1: right(10, 6), 3: right(10, 8)}) == 1


def test_the_strongest_challenger_wins() -> None:
    candidates = [{"experience": 1}, {"experience": 2}, {"experience": 3}]
    chosen = label_switch(candidates, {1: right(100, 50), 2: right(100, 70), 3: right(100, 90)})
    assert chosen == 3 and candidates[2]["z_over_top_vote"] > candidates[1]["z_over_top_vote"]
