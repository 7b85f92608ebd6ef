"""The probe protocol: leave-one-out weighted kNN, cross-validated linear probe, baselines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from learners.protocol import (
    MIN_CLASS_IMAGES,
    linear_probe_cv_accuracy,
    loo_knn_accuracy,
    loo_knn_correct,
    loo_knn_predict,
    paired_z,
    pixel_features,
    score_probes,
)

# Five unit vectors in the plane, by hand: A0=(1,0), A1=(.96,.28), B0=(0,1), B1=(.28,.96),
# and X=(.6,.8) labelled A. Cosines of X: A0 .6, A1 .8, B0 .8, B1 .936 -> its nearest
# *other* point is B1, so leave-one-out 1-NN gets X wrong and the other four right.
HAND = torch.tensor([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0], [0.28, 0.96], [0.6, 0.8]])
HAND_Y = torch.tensor([0, 0, 1, 1, 0])


def clusters(per_class: int, classes: int, dim: int, spread: float, seed: int = 1):
    centres = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return centres[labels] + spread * noise, labels


def test_hand_computed_leave_one_out_1nn():
    assert loo_knn_predict(HAND, HAND_Y, k=1).tolist() == [0, 0, 1, 1, 1]
    accuracy, k = loo_knn_accuracy(HAND, HAND_Y, k=20)
    assert (accuracy, k) == (pytest.approx(0.8), 1)  # k capped at the smallest class (2) minus one


def test_an_image_never_votes_for_itself():
    # two identical points of different classes: with itself excluded each sees only the other
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert loo_knn_predict(x, torch.tensor([0, 1]), k=1).tolist() == [1, 0]


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # the query (row 0) has one A neighbour at cos .9 and two B neighbours at cos .5
    b = [0.5, math.sqrt(0.75)]
    x = torch.tensor([[1.0, 0.0], [0.9, math.sqrt(0.19)], b, b])
    y = torch.tensor([0, 0, 1, 1])
    assert loo_knn_predict(x, y, k=3, temperature=0.07)[0].item() == 0  # e^(.9/.07) > 2 e^(.5/.07)
    assert loo_knn_predict(x, y, k=3, temperature=100.0)[0].item() == 1  # ~1 < ~2: a plain majority


def test_chunked_prediction_equals_one_chunk():
    x, y = clusters(30, 4, 8, spread=1.0)
    torch.testing.assert_close(loo_knn_predict(x, y, k=5, chunk_size=7), loo_knn_predict(x, y, k=5))


def test_linear_probe_separates_clusters_and_is_near_chance_on_random_labels():
    x, y = clusters(40, 4, 16, spread=0.1)
    assert linear_probe_cv_accuracy(x, y) == (1.0, 5)
    random_y = torch.randint(0, 4, (len(y),), generator=torch.Generator().manual_seed(3))
    accuracy, _ = linear_probe_cv_accuracy(torch.randn(len(y), 16), random_y)
    assert accuracy < 0.45
    assert linear_probe_cv_accuracy(x[:6], torch.tensor([0, 0, 0, 1, 1, 1]))[1] == 3  # folds <= class size


def test_score_probes_reaches_one_on_perfect_features_and_reports_k_chance_and_dropped_classes():
    x, y = clusters(12, 3, 16, spread=0.05)
    labels = [str(int(v)) for v in y] + ["rare"] * (MIN_CLASS_IMAGES - 1) + [None]
    features = torch.cat([x, torch.randn(MIN_CLASS_IMAGES, 16)])
    score = score_probes(features, labels)
    assert (score.knn, score.linear) == (1.0, 1.0)
    assert (score.classes, score.scored, score.k, score.folds) == (3, 36, 11, 5)
    assert score.chance == pytest.approx(1 / 3)


def test_score_probes_reports_nothing_without_two_scorable_classes():
    labels = ["a"] * 10 + ["b"] * (MIN_CLASS_IMAGES - 1)
    score = score_probes(torch.randn(len(labels), 4), labels)
    assert score.knn is None and score.linear is None and score.scored == 0


def test_pixel_features_are_flattened_unit_vectors():
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = pixel_features(images)
    assert features.shape == (5, 48)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(features[2] * images[2].float().norm(), images[2].float().flatten())


def test_loo_knn_correct_marks_the_rows_loo_knn_gets_right():
    assert loo_knn_correct(HAND, HAND_Y, k=1).tolist() == [True, True, True, True, False]


def test_paired_z_counts_only_the_rows_where_the_two_disagree():
    right = torch.tensor([True] * 6 + [False] * 4)
    assert paired_z(right, right) == 0.0
    # 5 rows only the first gets right, 1 only the second: (5 - 1) / sqrt(6)
    first = torch.tensor([True] * 5 + [False] + [True] * 4)
    second = torch.tensor([False] * 5 + [True] + [True] * 4)
    assert paired_z(first, second) == pytest.approx(4 / math.sqrt(6))
    assert paired_z(second, first) == pytest.approx(-4 / math.sqrt(6))
