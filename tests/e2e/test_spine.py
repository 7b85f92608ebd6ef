"""The spine end to end: real broker, real daemon process, two domains, SIGTERM, exact resume, DLQ."""

from __future__ import annotations

import json
import re
import signal

import pytest
from kafka import KafkaConsumer, KafkaProducer

from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.streams import metric, produce, produced_ids
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_domains_checkpoint_sigterm_resume_dlq(broker, tmp_path):
    topic = unique_topic("spine")
    bootstrap = broker.bootstrap
    produce(bootstrap, topic, "builtin:digits", 96)
    produce(bootstrap, topic, "builtin:fashion", 96, batch=4)
    settings = dict(experience_images=10_000, probe_fraction=0.1, batch_size=32, replay_share=0.5,
                    audit_trained_ids="true", checkpoint_interval_s=3600)
    state = tmp_path / "state"
    daemon = DaemonProcess(state, bootstrap, topic, **settings).start()
    try:
        # the domain change ends experience 1; the second domain is experience 2 in progress
        daemon.wait_for(lambda: daemon.status().get("images_total", 0) >= 150, 240, "two domains trained")
        assert daemon.status()["experience"] == 2
        assert (state / "checkpoints" / "exp-000001" / "manifest.json").is_file()
        text = daemon.metrics()
        assert metric(text, "tailord_images_trained_total") >= 150
        assert metric(text, "tailord_experience") == 2
        assert metric(text, "tailord_last_checkpoint_timestamp_seconds") > 0
        assert daemon.get("/readyz")[0] == 200
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()

    # the SIGTERM checkpoint holds the stream position: everything produced so far
    latest = (state / "checkpoints" / "LATEST").read_text()
    offsets = json.loads((state / "checkpoints" / latest / "offsets.json").read_text())["positions"]
    assert offsets == {"0": 96 + 96 // 4}
    trained_before = (state / "metrics" / "trained_ids.log").read_text().split()

    # new data while stopped + hostile records; restart resumes at the stored offsets
    produce(bootstrap, topic, "builtin:textures", 40)
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    bad = [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff\xe0" + b"junk" * 10]
    for value in bad:
        producer.send(topic, value=value, headers=[("domain", b"textures")])
    producer.flush()
    producer.close()

    daemon = DaemonProcess(state, bootstrap, topic, **settings).start()
    try:
        daemon.wait_for(lambda: metric(daemon.metrics(), "tailord_records_consumed_total") >= 44, 240,
                        "the new records consumed")
        resumed = [e for e in daemon.logs() if e.get("event") == "resumed"][-1]
        assert resumed["positions"] == {"0": 96 + 24}
        text = daemon.metrics()
        assert sum(float(v) for v in re.findall(r'^tailord_records_rejected_total{reason="[^"]+"} (\S+)$', text,
                                                re.M)) == len(bad)
        assert daemon.get("/healthz")[0] == 200
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()

    trained = (state / "metrics" / "trained_ids.log").read_text().split()
    trained_after = trained[len(trained_before):]
    all_ids = produced_ids(bootstrap, topic)
    from deploy.probes import hashed_probe

    expected = {i for i in all_ids if not hashed_probe(i, 0.1)}
    assert expected <= set(trained), "a produced sample was skipped"
    assert set(trained_after) <= {i for i in expected if i.startswith("textures/")}, "resume retrained old data"
    assert len(trained_after) == len(set(trained_after))

    dlq = KafkaConsumer(f"{topic}.dlq", bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                        consumer_timeout_ms=3000)
    reasons = [dict(m.headers).get("reject-reason", b"").decode() for m in dlq]
    dlq.close()
    assert len(reasons) == len(bad) and all(reasons)
