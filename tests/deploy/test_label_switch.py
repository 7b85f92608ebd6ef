"""deploy.snapshots.label_switch: labels overturn the routing vote only where it nearly tied,
and only by a significant and sizeable gain in leave-one-out kNN accuracy on the labelled targets."""

import torch

from deploy.snapshots import LABEL_SWITCH_GAIN, LABEL_SWITCH_VOTE, LABEL_SWITCH_Z, label_switch


def right(n: int, first: int) -> torch.Tensor:
    """(n,) bool: the first `first` rows right."""
    return torch.arange(n) < first


def voted(*experiences: int, shares: tuple[float, ...] = (0.4, 0.35, 0.25)) -> list[dict]:
    """Candidates in vote order; by default the vote nearly ties."""
    pairs = zip(experiences, shares[:len(experiences)], strict=True)
    return [{"experience": exp, "vote_share": share} for exp, share in pairs]


def test_a_dead_top_vote_is_overturned() -> None:
    candidates = voted(2, 1)
    assert label_switch(candidates, {2: right(8, 0), 1: right(8, 8)}) == 1
    assert candidates[1]["z_over_top_vote"] >= LABEL_SWITCH_Z


def test_a_clear_vote_is_never_overturned() -> None:
    """The same dead top vote, but the runner-up had under half its vote share."""
    candidates = voted(2, 1, shares=(0.7, 0.7 * LABEL_SWITCH_VOTE - 0.01))
    assert label_switch(candidates, {2: right(8, 0), 1: right(8, 8)}) == 2
    assert candidates[1]["z_over_top_vote"] >= LABEL_SWITCH_Z  # still reported


def test_significant_but_small_gain_keeps_the_vote() -> None:
    """400 labels, 12 more right: McNemar z 3.5, but 3 points of accuracy."""
    candidates = voted(4, 2)
    assert label_switch(candidates, {4: right(400, 300), 2: right(400, 312)}) == 4
    assert candidates[1]["z_over_top_vote"] > LABEL_SWITCH_Z and LABEL_SWITCH_GAIN > 12 / 400


def test_a_large_but_lucky_gain_keeps_the_vote() -> None:
    """10 labels, 2 more right: 20 points, but z 1.4 is what luck gives."""
    assert label_switch(voted(1, 3), {1: right(10, 6), 3: right(10, 8)}) == 1


def test_the_strongest_challenger_wins() -> None:
    candidates = voted(1, 2, 3)
    chosen = label_switch(candidates, {1: right(100, 50), 2: right(100, 70), 3: right(100, 90)})
    assert chosen == 3 and candidates[2]["z_over_top_vote"] > candidates[1]["z_over_top_vote"]
