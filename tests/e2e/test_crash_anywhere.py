"""Crash anywhere: SIGKILL the daemon at random moments (steps, checkpoints, index swaps), restart it
each time, and check at the end that nothing was skipped and every resume used a sound checkpoint."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest

from deploy.checkpoints import verify
from deploy.probes import hashed_probe
from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.streams import produce, produced_ids
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
KILLS = 10
# The on-disk index writes its .ivfdata list files during index swaps: kills land there too.
INDEXES = {"flat": {}, "ivf-ondisk": {"index_exact_max": 50, "index_ondisk": "true"}}


@pytest.mark.parametrize("index", INDEXES)
def test_sigkill_ten_times_loses_nothing(broker, tmp_path, index):
    topic = unique_topic("crash")
    for source in ("builtin:digits", "builtin:fashion", "builtin:textures"):
        produce(broker.bootstrap, topic, source, 120, batch=4)
    state = tmp_path / "state"
    settings = dict(experience_images=70, probe_fraction=0.1, batch_size=32, checkpoint_interval_s=1,
                    audit_trained_ids="true", keep_experiences=3, **INDEXES[index])
    rng = random.Random(7)
    resumed_from: list[str] = []
    for attempt in range(KILLS):
        daemon = DaemonProcess(state, broker.bootstrap, topic, **settings).start()
        time.sleep(rng.uniform(0.5, 4.0))  # lands in steps, checkpoints, experience ends, index refreshes
        daemon.kill()
        assert daemon.proc.returncode == -signal.SIGKILL, f"attempt {attempt}: exited by itself"
    final = DaemonProcess(state, broker.bootstrap, topic, exit_when_idle_s=4, **settings)
    final.start(wait=120)
    assert final.proc.wait(timeout=600) == 0, final.tail()

    events = final.logs()
    resumed_from = [e["checkpoint"] for e in events if e.get("event") == "resumed"]
    assert len(resumed_from) >= KILLS - 2, "most restarts should resume from a checkpoint"
    assert not [e for e in events if e.get("event") == "daemon_failed"]

    # every produced, non-probe sample was trained at least once
    trained = set((state / "metrics" / "trained_ids.log").read_text().split())
    expected = {i for i in produced_ids(broker.bootstrap, topic) if not hashed_probe(i, 0.1)}
    assert expected - trained == set(), f"{len(expected - trained)} samples skipped"

    # the final state agrees with itself: checkpoint, offsets, history, probe sets, buffer, index
    latest_name = (state / "checkpoints" / "LATEST").read_text()
    latest = verify(state / "checkpoints" / latest_name)
    assert latest is not None
    offsets = json.loads((latest.path / "offsets.json").read_text())["positions"]
    assert offsets == {"0": 3 * 120 // 4}
    finished = latest.manifest["experience"]
    history = json.loads((state / "metrics" / "history.json").read_text())
    assert history["experiences"] == list(range(1, finished + 1))
    assert sorted(p.name for p in (state / "metrics" / "probes").glob("exp-*.safetensors"))[:finished] == [
        f"exp-{j:06d}.safetensors" for j in range(1, finished + 1)]
    buffer_meta = json.loads((latest.path / "replay" / "buffer.json").read_text())
    buffered = {i for reservoir in buffer_meta["reservoirs"] for i in reservoir["sample_ids"]}
    assert buffered and buffered <= trained
    status_events = [e for e in events if e.get("event") == "index_refreshed"]
    assert status_events, "the index was refreshed at least once in the final run"
    live = (state / "index" / (state / "index" / "CURRENT").read_text().strip())
    assert (live / "index.ivfdata").exists() == (index == "ivf-ondisk")
