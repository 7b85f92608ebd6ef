"""SEPT in a child process: the same weights as in process (same seeds), its own niceness,
and a failing child is a clear error."""

import pytest
import torch

from deploy.sept_child import continue_checkpoint, continue_in_child
from deploy.snapshot_errors import Unavailable
from tests.snapshot_testkit import RES, build_state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = build_state(tmp_path_factory.mktemp("state"), {1: "red", 2: "blue"}, n=8, probes=0)
    return state / "checkpoints" / "exp-000002"


def images(n: int = 12) -> torch.Tensor:
    """(n, 3, RES, RES) uint8 noise."""
    return torch.randint(0, 256, (n, 3, RES, RES), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def test_child_trains_exactly_like_the_process(checkpoint):
    here, steps_here = continue_checkpoint(checkpoint, images(), "cpu", epochs=2, max_steps=5)
    child, steps_child = continue_in_child(checkpoint, images(), "cpu", epochs=2, max_steps=5, threads=1,
                                           niceness=5)
    assert steps_here == steps_child == 2
    for (name, a), (_, b) in zip(here.state_dict().items(), child.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert not child.training


def test_a_failing_child_is_unavailable(tmp_path):
    with pytest.raises(Unavailable, match="SEPT's child process failed"):
        continue_in_child(tmp_path / "no-such-checkpoint", images(), "cpu", epochs=1, max_steps=1)
