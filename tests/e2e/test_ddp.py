"""DDP end to end: `tailord run --nproc 2` (torchrun, gloo on CPU) on a 2-partition topic.

Each rank reads its own partition; the test checks that both ranks trained, that their
weights are bit-identical when they stop, that the checkpoint holds every partition's
offset, that a restart resumes each partition there (nothing trained twice, nothing
skipped, also after a SIGTERM) and that a domain change ends exactly one experience across the
ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from streamer.topics import ensure_topic
from tests.e2e.streams import produce, produced_ids
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def run_ranks(state: Path, bootstrap: str, topic: str, log_path: Path, term_after: float | None = None) -> list[dict]:
    """Run two ranks until the stream is idle (or SIGTERM `term_after` s after both started their
    streams); their JSON log lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILORD_")}
    env.update({"TAILORD_STATE_DIR": str(state), "TAILORD_TOPIC": topic, "TAILORD_BOOTSTRAP_SERVERS": bootstrap,
                "TAILORD_HTTP_PORT": "0", "TAILORD_LOG_FORMAT": "json", "TAILORD_PRESET": "cpu",
                "TAILORD_BATCH_SIZE": "16", "TAILORD_EXPERIENCE_IMAGES": "10000", "TAILORD_PROBE_FRACTION": "0",
                "TAILORD_STRATEGY": "replay", "TAILORD_AUDIT_TRAINED_IDS": "true",
                "TAILORD_EXIT_WHEN_IDLE_S": "4", "TAILORD_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run", "--nproc", "2"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            if term_after is not None:  # once both ranks are set up and training
                deadline = time.monotonic() + 120
                while log_path.read_text().count('"rank_partitions"') < 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                time.sleep(term_after)
                proc.send_signal(signal.SIGTERM)  # relayed to the ranks: both checkpoint and exit 0
            returncode = proc.wait(timeout=300)
        finally:
            proc.kill()
    text = log_path.read_text()
    assert returncode == 0, text[-4000:]
    events = []
    for line in text.splitlines():
        start = line.find("{")  # torchrun may prefix a rank tag
        if start >= 0:
            try:
                events.append(json.loads(line[start:]))
            except ValueError:
                continue
    return events


def by_rank(events: list[dict], name: str) -> dict[int, dict]:
    return {e["rank"]: e for e in events if e.get("event") == name}


def end_offsets(bootstrap: str, topic: str) -> dict[str, int]:
    """Last offset + 1 of each partition, by reading it (tansu's ListOffsets stops at the last
    record batch's base offset)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000,
                             enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, p) for p in (0, 1)])
    ends = {"0": 0, "1": 0}
    for msg in consumer:
        ends[str(msg.partition)] = max(ends[str(msg.partition)], msg.offset + 1)
    consumer.close()
    return ends


def latest_checkpoint(state: Path) -> Path:
    return state / "checkpoints" / (state / "checkpoints" / "LATEST").read_text().strip()


def test_two_ranks_train_one_model_and_resume_every_partition(broker, tmp_path):
    topic = unique_topic("ddp")
    bootstrap = broker.bootstrap
    ensure_topic(bootstrap, topic, 2)
    produce(bootstrap, topic, "builtin:digits", 120)  # keyed by sample id: spread over both partitions
    first_ends = end_offsets(bootstrap, topic)
    assert min(first_ends.values()) > 0, first_ends
    state = tmp_path / "state"

    events = run_ranks(state, bootstrap, topic, tmp_path / "run1.log")
    partitions = by_rank(events, "rank_partitions")
    assert {r: e["partitions"] for r, e in partitions.items()} == {0: [0], 1: [1]}
    stopped = by_rank(events, "stopped")
    assert set(stopped) == {0, 1}
    assert all(e["images_trained_here"] > 0 for e in stopped.values()), stopped
    assert stopped[0]["weights_sha256"] == stopped[1]["weights_sha256"]
    assert stopped[0]["images_total"] == stopped[1]["images_total"] == 120
    checkpoint = latest_checkpoint(state)
    assert json.loads((checkpoint / "offsets.json").read_text())["positions"] == first_ends
    assert (checkpoint / "replay" / "buffer.json").is_file() and (checkpoint / "replay-rank1" / "buffer.json").is_file()

    produce(bootstrap, topic, "builtin:fashion", 80)
    events = run_ranks(state, bootstrap, topic, tmp_path / "run2.log", term_after=2)
    resumed = by_rank(events, "resumed")
    assert {r: e["positions"] for r, e in resumed.items()} == {0: first_ends, 1: first_ends}
    assert set(by_rank(events, "stop_requested")) == {0, 1} and set(by_rank(events, "stopped")) == {0, 1}
    stored = json.loads((latest_checkpoint(state) / "offsets.json").read_text())["positions"]

    events = run_ranks(state, bootstrap, topic, tmp_path / "run3.log")
    resumed = by_rank(events, "resumed")
    assert {r: e["positions"] for r, e in resumed.items()} == {0: stored, 1: stored}
    stopped = by_rank(events, "stopped")
    assert stopped[0]["weights_sha256"] == stopped[1]["weights_sha256"]
    assert stopped[0]["images_total"] == 200

    trained = (state / "metrics" / "trained_ids.log").read_text().split()
    assert sorted(trained) == sorted(produced_ids(bootstrap, topic))  # each once: no skip, no retrain
    manifest = json.loads((latest_checkpoint(state) / "manifest.json").read_text())
    assert manifest["progress"]["experience"] == 2  # digits -> fashion: one boundary, not one per rank
    assert manifest["world_size"] == 2
    assert json.loads((latest_checkpoint(state) / "offsets.json").read_text())["positions"] == \
        end_offsets(bootstrap, topic)
