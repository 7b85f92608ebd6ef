"""Stream helpers for end-to-end tests: produce with the real CLI, read ids back, parse /metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from kafka import KafkaConsumer


def produce(bootstrap: str, topic: str, source: str, limit: int, domain: str | None = None, batch: int = 1) -> None:
    cmd = [sys.executable, "-m", "deploy.cli", "produce", source, "--topic", topic, "--bootstrap", bootstrap,
           "--limit", str(limit), "--batch", str(batch)]
    if domain:
        cmd += ["--domain", domain]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["sent"] == limit


def produced_ids(bootstrap: str, topic: str) -> list[str]:
    """Every sample id on the topic (single images and tar members), read back from the broker."""
    from streamer.decode import decode_record
    from streamer.limits import DecodeLimits
    from streamer.records import RejectedRecord

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000, enable_auto_commit=False)
    ids = []
    for msg in consumer:
        try:
            ids.extend(image.headers["sample-id"] for image in
                       decode_record(msg.value, list(msg.headers), DecodeLimits(), 32))
        except RejectedRecord:
            continue
    consumer.close()
    return ids


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")
