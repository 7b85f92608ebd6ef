"""SEPT in a child process: the same weights as in process (same seeds), a failing child is a
clear error, its work folder goes away, and it does not outlive the daemon."""

import subprocess
import sys
import time
from pathlib import Path

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


def test_the_work_folder_goes_away_and_leftovers_are_staging(checkpoint, tmp_path):
    continue_in_child(checkpoint, images(), "cpu", epochs=1, max_steps=1, work_parent=tmp_path)
    assert list(tmp_path.iterdir()) == []  # and a crash's leftover would be a `.tmp-*` staging folder


def test_the_child_dies_with_the_daemon(checkpoint, tmp_path):
    """SIGKILL the process that started a long SEPT child: the child is sent SIGTERM and ends."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from deploy.sept_child import continue_in_child\n"
        "images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)\n"
        "continue_in_child(Path(sys.argv[1]), images, 'cpu', epochs=10**6, max_steps=10**6, work_parent=Path(sys.argv[2]))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(checkpoint), str(tmp_path)])
    try:
        child = wait_for(lambda: children_of(parent.pid), 60)
        time.sleep(1)  # past the child's start (its prctl)
        parent.kill()
        parent.wait(10)
        assert wait_for(lambda: not Path(f"/proc/{child[0]}").exists() or zombie(child[0]), 30)
    finally:
        parent.kill()


def children_of(pid: int) -> list[int]:
    """Live child pids of `pid` (Linux /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            found.append(int(status.parent.name))
    return found


def zombie(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def wait_for(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")
