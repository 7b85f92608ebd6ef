"""deploy/evaluate: rows of the accuracy matrices and the floors of a new probe set, on a real learner."""

from __future__ import annotations

import pytest
import torch

from deploy.evaluate import UNTRAINED_FILE, evaluate_row, keep_untrained, score_baselines
from deploy.history import History
from deploy.learner import build_learner
from deploy.probes import ProbeSet
from deploy.settings import Settings
from learners.protocol import pixel_features, score_probes

SIZE = 16


@pytest.fixture(scope="module")
def learner():
    return build_learner(Settings(preset="cpu", device="cpu", method="simclr", resolution=SIZE,
                                  batch_size=8, seed=0))


def separable_probes(experience: int, per_class: int = 12, labelled: bool = True) -> ProbeSet:
    """Dark and bright noise images: any encoder and raw pixels separate the two classes."""
    probes = ProbeSet(experience, 1000)
    generator = torch.Generator().manual_seed(experience)
    for i in range(2 * per_class):
        bright = i % 2
        image = torch.randint(0, 40, (3, SIZE, SIZE), generator=generator, dtype=torch.uint8) + 200 * bright
        probes.add(f"s{experience}-{i}", image.to(torch.uint8), ("bright" if bright else "dark") if labelled else None,
                   "d")
    return probes


def test_row_scores_every_finished_probe_set_and_cka_is_one_against_itself(learner, tmp_path):
    sets = {1: separable_probes(1), 2: separable_probes(2, labelled=False), 3: separable_probes(3)}
    row = evaluate_row(learner, sets, 3, tmp_path / "features")
    assert row.accuracy == [1.0, None, 1.0] and row.linear == [1.0, None, 1.0]
    assert row.cka[2] == pytest.approx(1.0) and row.cka[:2] == [None, None]  # references saved at their end only
    assert all(loss > 0 for loss in row.probe_loss)
    assert (tmp_path / "features" / "exp-000003.safetensors").is_file()


def test_row_equals_the_protocol_applied_to_the_embedded_probes(learner, tmp_path):
    from learners.evaluation import embed

    probes = separable_probes(1)
    probes.labels[:6] = ["bright"] * 6  # mislabel some, so the score is not trivially 1
    row = evaluate_row(learner, {1: probes}, 1, tmp_path)
    expected = score_probes(embed(learner.backbone, probes.stacked(), learner.eval_transform), probes.labels)
    assert (row.accuracy[0], row.linear[0]) == (expected.knn, expected.linear)
    assert row.accuracy[0] < 1.0


def test_baselines_score_pixels_and_the_kept_step0_weights(learner, tmp_path):
    probes = separable_probes(1)
    assert score_baselines(learner, probes, tmp_path)["untrained"] is None  # no step-0 weights kept yet
    keep_untrained(learner, tmp_path)
    step0 = (tmp_path / UNTRAINED_FILE).read_bytes()
    weights = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    with torch.no_grad():
        for p in learner.backbone.parameters():
            p.add_(1.0)  # "training" moves the live weights; the kept file must not follow
    keep_untrained(learner, tmp_path)
    assert (tmp_path / UNTRAINED_FILE).read_bytes() == step0
    learner.backbone.load_state_dict(weights)
    floors = score_baselines(learner, probes, tmp_path)
    assert floors["pixels"] == score_probes(pixel_features(probes.stacked()), probes.labels).to_json()
    assert floors["untrained"]["knn"] == 1.0 and floors["chance"] == 0.5 and floors["classes"] == 2
    assert floors["k"] == 11 and floors["scored"] == 24
    assert score_baselines(learner, separable_probes(2, labelled=False), tmp_path) == {}


def test_history_keeps_linear_rows_and_baselines_and_reads_old_histories(learner, tmp_path):
    history = History()
    row = evaluate_row(learner, {1: separable_probes(1)}, 1, tmp_path)
    history.add_row(1, row, {"pixels": {"knn": 0.5}}, {"domain": "d"})
    restored = History.from_json(history.to_json())
    assert restored.linear == [[1.0]] and restored.baselines == {"1": {"pixels": {"knn": 0.5}}}
    assert restored.summary()["acc_linear"] == 1.0
    old = {k: v for k, v in history.to_json().items() if k not in ("linear", "baselines")}
    assert History.from_json(old).linear == [[None]]
