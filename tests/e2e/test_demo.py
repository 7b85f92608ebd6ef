"""`tailord demo`: its state-dir safety and sizing (fast), the whole quick story and Ctrl-C (slow)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.demo import FULL, MARKER, QUICK, prepare_state_dir, trained_count
from deploy.errors import UsageError

TAILORD = str(Path(sys.executable).with_name("tailord"))  # the console script users run


def test_state_dir_is_created_and_marked(tmp_path):
    state = prepare_state_dir(tmp_path / "demo", keep=False)
    assert (state / MARKER).is_file()


def test_previous_demo_state_is_wiped_unless_kept(tmp_path):
    state = prepare_state_dir(tmp_path / "demo", keep=False)
    (state / "checkpoints").mkdir()
    prepare_state_dir(state, keep=True)
    assert (state / "checkpoints").is_dir()
    prepare_state_dir(state, keep=False)
    assert not (state / "checkpoints").exists() and (state / MARKER).is_file()


def test_a_folder_the_demo_did_not_make_is_never_wiped(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="not a demo state dir"):
        prepare_state_dir(precious, keep=False)
    assert (precious / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("plan", [QUICK, FULL], ids=["quick", "full"])
def test_plan_sizes(plan):
    """The last domain trains the most images (its experience ends by count); the full demo's probe
    sets hold >= 30 images of every class, the quick one's >= 10 (the protocol scores classes >= 5)."""
    from collections import Counter
    from itertools import islice

    from deploy.demo import PROBE_FRACTION, PROBE_MAX_IMAGES
    from deploy.probes import hashed_probe
    from streamer.sources.builtin import builtin

    counts = [trained_count(name, count) for name, count in plan.domains]
    assert counts[-1] > max(counts[:-1])
    for name, count in plan.domains:
        probes = Counter(item.label for item in islice(builtin(name), count)
                         if hashed_probe(f"{name}/{item.key}", PROBE_FRACTION))
        assert min(probes.values()) >= (30 if plan is FULL else 10), (name, probes)
        assert sum(probes.values()) <= PROBE_MAX_IMAGES


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def daemon_pid(output: str) -> int:
    match = re.search(r"daemon up \(pid (\d+)\)", output)
    assert match, output
    return int(match.group(1))


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_demo_tells_the_whole_story(tmp_path):
    state = tmp_path / "demo-state"
    started = time.monotonic()
    done = subprocess.run([TAILORD, "demo", "--quick", "--state-dir", str(state)], capture_output=True, text=True,
                          timeout=900)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{(state / 'daemon.log').read_text()[-3000:]}"
    out = done.stdout
    for expected in ("accuracy matrix R", "floor: raw pixels", "floor: untrained", "average forgetting", "BWT",
                     "snapshot:", "the routing vote put",
                     "/metrics", "/admin/status", "checkpoints:"):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert re.search(r"^ACC \d\.\d{3} ", out, re.M), "ACC must be a number:\n" + out
    final_row = re.search(r"^ +photos((?: +\d\.\d{3}){4})$", out, re.M)
    assert final_row, "the last row of R must score all four probe sets:\n" + out
    for floor in ("floor: raw pixels", "floor: untrained"):
        assert re.search(rf"{floor}((?: +\d\.\d{{3}}){{4}})$", out, re.M), f"{floor} row incomplete:\n{out}"
    assert re.search(r"final encoder vs untrained \(kNN\): .* on \d of 4 domains", out), out
    token = (state / "admin.token").read_text().strip()
    assert token not in out and (state / "admin.token").stat().st_mode & 0o077 == 0
    assert re.search(r"routing vote put \d+% on experience 2 \(fashion\)", out), "routing should find fashion:\n" + out
    assert re.search(r"snapshot: +sept from experience 4's checkpoint \(photos\)", out), "sept starts from the newest:\n" + out
    assert (state / "report.png").stat().st_size > 50_000
    assert (state / "demo-snapshot" / "manifest.json").is_file()
    assert (state / "demo-snapshot" / "model.safetensors").is_file()
    assert list((state / "snapshots").glob("*/manifest.json"))
    assert (state / "checkpoints" / "exp-000004" / "manifest.json").is_file()
    assert not alive(daemon_pid(out)), "the daemon outlived the demo"
    print(f"quick demo wall time: {elapsed:.0f} s")


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_stops_the_daemon_cleanly(tmp_path):
    state = tmp_path / "demo-state"
    log = tmp_path / "demo.out"
    with open(log, "wb") as out:
        demo = subprocess.Popen([TAILORD, "demo", "--quick", "--state-dir", str(state)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "[3/5]" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        time.sleep(5)  # let it train a little
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=180) == 130, log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
    assert not alive(daemon_pid(log.read_text()))
    assert (state / "checkpoints" / "LATEST").is_file(), "the daemon did not checkpoint on the way out"
