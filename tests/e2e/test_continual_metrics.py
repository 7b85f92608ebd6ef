"""Forgetting metrics end to end: three labelled domains -> R rows on /metrics, kept across a restart."""

from __future__ import annotations

import json
import re
import signal

import pytest

from deploy.probes import hashed_probe
from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.streams import metric, produce, produced_ids
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def knn_series(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^tailord_knn_accuracy{probe_experience="(\d+)"} (\S+)$', text, re.M)}


def series_value(text: str, series: str) -> float:
    """The value of one exact series (name and labels) in a /metrics text."""
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " "))


def check_baselines(text: str, matrix: dict) -> None:
    """Both floors of both probe sets are exported, persisted and agree; chance is a real floor."""
    for j in ("1", "2"):
        floors = matrix["baselines"][j]
        assert floors["classes"] >= 2 and floors["k"] >= 4 and 0 < floors["chance"] < 1
        for baseline in ("pixels", "untrained"):
            for kind in ("knn", "linear"):
                value = floors[baseline][kind]
                assert floors["chance"] < value <= 1.0, (j, baseline, kind, floors)
                series = f'tailord_{kind}_baseline_accuracy{{baseline="{baseline}",probe_experience="{j}"}}'
                assert series_value(text, series) == pytest.approx(value)
        assert matrix["R_linear"][1][int(j) - 1] is not None


def check_row_recomputes(state, matrix: dict) -> None:
    """R[1][0] is the protocol applied to probe set 1's images embedded by checkpoint 2."""
    import torch

    from deploy.indexer import backbone_from_checkpoint
    from deploy.probes import ProbeSet
    from learners.augment import EvalTransform
    from learners.evaluation import embed
    from learners.protocol import score_probes

    probes = ProbeSet.load(state / "metrics" / "probes" / "exp-000001.safetensors")
    backbone, manifest = backbone_from_checkpoint(state / "checkpoints" / "exp-000002", "cpu")
    resolution = probes.images[0].shape[-1]
    with torch.no_grad():
        features = embed(backbone, probes.stacked(), EvalTransform(resolution))
    expected = score_probes(features, probes.labels)
    assert matrix["R"][1][0] == pytest.approx(expected.knn, abs=1e-6)
    assert matrix["R_linear"][1][0] == pytest.approx(expected.linear, abs=1e-6)


@pytest.mark.parametrize("strategy", ["replay+distill"])
def test_three_domains_forgetting_metrics_survive_restart(broker, tmp_path, strategy):
    topic = unique_topic("continual")
    for source in ("builtin:digits", "builtin:fashion", "builtin:textures"):
        produce(broker.bootstrap, topic, source, 240, batch=8)
    state = tmp_path / "state"
    settings = dict(experience_images=100_000, probe_fraction=0.3, batch_size=32, strategy=strategy,
                    checkpoint_interval_s=3600)
    daemon = DaemonProcess(state, broker.bootstrap, topic, **settings).start()
    try:
        # digits and fashion end on the domain change; textures stays the experience in progress
        matrix_file = state / "metrics" / "accuracy_matrix.json"

        def two_rows() -> bool:  # written right after the experience-end checkpoint
            return matrix_file.is_file() and len(json.loads(matrix_file.read_text())["R"]) == 2

        daemon.wait_for(two_rows, 300, "two finished experiences")
        trained = sum(not hashed_probe(i, settings["probe_fraction"]) for i in produced_ids(broker.bootstrap, topic))
        daemon.wait_for(lambda: metric(daemon.metrics(), "tailord_images_trained_total") == trained, 120,
                        "every image trained")  # the last step is a later step of textures, off the anchor
        text = daemon.metrics()
        assert set(knn_series(text)) == {"1", "2"}
        assert all(0.0 < v <= 1.0 for v in knn_series(text).values())
        for name in ("tailord_average_forgetting", "tailord_backward_transfer",
                     'tailord_representation_drift_cka{probe_experience="1"}',
                     'tailord_probe_ssl_loss{probe_experience="2"}'):
            assert name in text, name
        forgetting = metric(text, "tailord_average_forgetting")
        matrix = json.loads(matrix_file.read_text())
        assert len(matrix["R"][1]) == 2
        assert forgetting == pytest.approx(matrix["R"][0][0] - matrix["R"][1][0], abs=1e-6)
        assert metric(text, "tailord_backward_transfer") == pytest.approx(matrix["R"][1][0] - matrix["R"][0][0],
                                                                          abs=1e-6)
        # distillation towards the experience-1 encoder: the live encoder has moved away from it
        # (> 0), and the penalty is lambda (1.0) times a mean of 1 - cos, at most 2
        assert 0.0 < metric(text, "tailord_regularizer_penalty") <= 2.0
        check_baselines(text, matrix)
        check_row_recomputes(state, matrix)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()

    daemon = DaemonProcess(state, broker.bootstrap, topic, **settings).start()
    try:
        text = daemon.metrics()
        assert knn_series(text) == pytest.approx({"1": matrix["R"][1][0], "2": matrix["R"][1][1]})
        assert metric(text, "tailord_average_forgetting") == pytest.approx(forgetting)
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.kill()
