"""The hostile record corpus end to end: every file of tests/data/bad/ goes to the running daemon.

Each file `<reason>__<what>.bin` is sent as one record value, between good images, plus a
few valid images with bad headers. The daemon must dead-letter each hostile record with
exactly the reason its file name states (the original bytes kept), count them in
`tailord_records_rejected_total{reason}`, train every good image, and stay up.
"""

from __future__ import annotations

import itertools
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from streamer.broker import EmbeddedBroker
from streamer.sources.builtin import digits
from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.streams import metric
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CORPUS = sorted((Path(__file__).parent.parent / "data" / "bad").glob("*.bin"))
GOOD_PER_SIDE = 16


def bad_header_cases(image: bytes) -> dict[str, tuple[bytes, list[tuple[str, bytes]]]]:
    """A valid image under headers the decoder must refuse: case -> (value, headers)."""
    return {
        "bad_header__value_not_utf8": (image, [("domain", b"\xff\xfe\xc3\x28")]),
        "bad_header__value_over_4096_bytes": (image, [("label", b"x" * 5000)]),
        "bad_header__65_headers": (image, [(f"h{i}", b"1") for i in range(65)]),
    }


def test_every_hostile_record_is_dead_lettered_with_its_reason(broker: EmbeddedBroker, tmp_path: Path) -> None:
    assert len(CORPUS) > 50, "tests/data/bad/ is missing (run tests/data/make_bad_corpus.py)"
    topic = unique_topic("hostile")
    good = list(itertools.islice(digits(), 2 * GOOD_PER_SIDE + 1))
    hostile = {path.stem: (path.read_bytes(), []) for path in CORPUS}
    hostile.update(bad_header_cases(good[-1].encoded))

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=2**20)
    good_ids = []
    for side, items in (("before", good[:GOOD_PER_SIDE]), ("after", good[GOOD_PER_SIDE:2 * GOOD_PER_SIDE])):
        if side == "after":
            for case, (value, headers) in hostile.items():
                producer.send(topic, value=value, headers=[*headers, ("case", case.encode())])
        for item in items:
            good_ids.append(f"{side}/{item.key}")
            producer.send(topic, value=item.encoded, headers=[("sample-id", good_ids[-1].encode())])
    producer.flush(timeout=30)
    producer.close()

    daemon = DaemonProcess(tmp_path / "state", broker.bootstrap, topic, batch_size=8, probe_fraction=0,
                           audit_trained_ids="true", experience_images=100_000,
                           checkpoint_interval_s=3600).start()
    try:
        daemon.wait_for(lambda: daemon.status().get("images_total", 0) >= len(good_ids), 120,
                        "the good images trained")
        text = daemon.metrics()
        rejected = {reason: float(n) for reason, n in
                    re.findall(r'^tailord_records_rejected_total{reason="([^"]+)"} (\S+)$', text, re.M)}
        expected = Counter(case.split("__")[0] for case in hostile)
        assert rejected == {reason: float(n) for reason, n in expected.items()}
        assert metric(text, "tailord_records_consumed_total") == len(good_ids) + len(hostile)
        assert daemon.get("/healthz")[0] == 200 and daemon.get("/readyz")[0] == 200
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
    trained = (daemon.state_dir / "metrics" / "trained_ids.log").read_text().split()
    assert sorted(trained) == sorted(good_ids)

    dlq = KafkaConsumer(f"{topic}.dlq", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                        consumer_timeout_ms=5000)
    dead = {}
    for message in dlq:
        headers = dict(message.headers)
        dead[headers["case"].decode()] = (headers["reject-reason"].decode(), message.value)
    dlq.close()
    assert sorted(dead) == sorted(hostile), "some hostile records are missing from the DLQ"
    wrong = {case: got for case, (got, _) in dead.items() if got != case.split("__")[0]}
    assert not wrong, f"dead-lettered with an unexpected reason: {wrong}"
    assert all(value == hostile[case][0] for case, (_, value) in dead.items()), "a DLQ value was altered"
