"""The probe protocol: how a labelled probe set scores a frozen representation.

Two standard read-outs of one set of features, with no training image and no separate
test split (a probe set holds a few hundred images):

- **leave-one-out weighted kNN** (Wu et al. 2018, DINO): each image is classified by the
  ``k`` most similar *other* images of the set, each voting ``exp(cos / T)`` (T = 0.07);
  ``k`` is capped at the smallest class's count minus one, so every query's class can
  fill the vote;
- **linear probe**: multinomial logistic regression (L2 1e-4, full-batch L-BFGS) on
  standardised frozen features, accuracy by stratified cross-validation (5 folds, or
  fewer when a class has fewer images; pooled over the folds).

Classes with fewer than ``MIN_CLASS_IMAGES`` images cannot be scored fairly and are left
out (``ProbeScore.scored`` says how many images remain). Perfect features score 1.0 on
both. ``chance`` is the share of the most frequent scored class (what a constant guess
gets).

Usage::

    score = score_probes(features, ["3", "7", "3", ...])  # features (N, D), any scale
    score.knn, score.linear, score.k, score.chance

    floor = score_probes(pixel_features(images_u8), labels)  # the raw-pixel baseline
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from learners.evaluation import encode_labels, linear_probe_accuracy

KNN_K = 20
KNN_TEMPERATURE = 0.07
LINEAR_FOLDS = 5
MIN_CLASS_IMAGES = 5  # a class needs this many probes to be scored (k >= 4, >= 2 per fold)


@dataclass(frozen=True)
class ProbeScore:
    """Scores of one representation on one labelled probe set (``None``: not scorable)."""

    knn: float | None  # leave-one-out weighted kNN accuracy
    linear: float | None  # cross-validated linear-probe accuracy
    k: int  # neighbours that voted
    folds: int  # cross-validation folds of the linear probe
    classes: int  # classes scored
    scored: int  # images scored (classes with >= MIN_CLASS_IMAGES images)
    chance: float | None  # accuracy of always guessing the most frequent class

    def to_json(self) -> dict[str, float | int | None]:
        return asdict(self)


UNSCORED = ProbeScore(None, None, 0, 0, 0, 0, None)


def loo_knn_predict(features: Tensor, labels: Tensor, k: int, temperature: float = KNN_TEMPERATURE,
                    chunk_size: int = 1024) -> Tensor:
    """Leave-one-out weighted-kNN predictions (int64, one per row of ``features``).

    Each row is classified by its ``k`` most cosine-similar other rows, each voting for its
    class with weight ``exp(s / temperature)``; the row itself never votes.
    """
    x = F.normalize(features.float(), dim=1)  # (N, D)
    labels = labels.long()
    k = min(k, len(x) - 1)
    if k < 1:
        raise ValueError("leave-one-out kNN needs at least two rows")
    num_classes = int(labels.max()) + 1
    predictions = []
    for start in range(0, len(x), chunk_size):
        sims = x[start:start + chunk_size] @ x.T  # (C, N)
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = float("-inf")  # no image votes for itself
        top_sims, top_idx = sims.topk(k, dim=1)  # (C, k)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, labels[top_idx], (top_sims / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def loo_knn_k(labels: Tensor, k: int = KNN_K) -> int:
    """The k leave-one-out kNN uses: at most `k` and at most the smallest class count - 1."""
    return max(1, min(k, min(Counter(labels.tolist()).values()) - 1))


def loo_knn_accuracy(features: Tensor, labels: Tensor, k: int = KNN_K,
                     temperature: float = KNN_TEMPERATURE) -> tuple[float, int]:
    """(accuracy, k used): leave-one-out weighted kNN with k <= smallest class count - 1."""
    return loo_knn_correct(features, labels, k, temperature).float().mean().item(), loo_knn_k(labels, k)


def loo_knn_correct(features: Tensor, labels: Tensor, k: int = KNN_K,
                    temperature: float = KNN_TEMPERATURE) -> Tensor:
    """(N,) bool: which rows leave-one-out weighted kNN (k <= smallest class count - 1) gets right."""
    return loo_knn_predict(features, labels, loo_knn_k(labels, k), temperature) == labels.long()


def paired_z(better: Tensor, baseline: Tensor) -> float:
    """McNemar's z for two classifiers scored on the same rows: (b - c) / sqrt(b + c), where b
    counts rows only `better` gets right and c rows only `baseline` gets right (0 when they
    agree everywhere). Above ~2, `better` is ahead by more than the rows' luck would give."""
    only_better = int((better & ~baseline).sum())
    only_baseline = int((baseline & ~better).sum())
    disagreements = only_better + only_baseline
    return 0.0 if disagreements == 0 else (only_better - only_baseline) / disagreements ** 0.5


def linear_probe_cv_accuracy(features: Tensor, labels: Tensor, folds: int = LINEAR_FOLDS,
                             seed: int = 0) -> tuple[float, int]:
    """(accuracy, folds used): stratified k-fold accuracy of a multinomial logistic regression.

    Folds come from scikit-learn's ``StratifiedKFold``; in each, the features are
    standardised with the training part's statistics and the regression is fit by
    full-batch L-BFGS (``learners.evaluation.linear_probe_accuracy``): a convex fit from
    zero weights, so deterministic, and fast on 3,072-d raw pixels where scikit-learn's
    solver took minutes on two cores.
    """
    y = labels.long()
    folds = min(folds, min(Counter(y.tolist()).values()))
    if folds < 2:
        raise ValueError("a cross-validated linear probe needs two images of every class")
    x = features.float().cpu()
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    correct = 0
    for train, test in splits.split(x.numpy(), y.numpy()):
        mean, std = x[train].mean(dim=0), x[train].std(dim=0).clamp_min(1e-6)
        accuracy = linear_probe_accuracy((x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test],
                                         num_classes=int(y.max()) + 1)
        correct += round(accuracy * len(test))
    return correct / len(y), folds


def score_probes(features: Tensor, labels: list[str | None], linear: bool = True) -> ProbeScore:
    """Both read-outs on the images whose class has >= MIN_CLASS_IMAGES labelled images."""
    counts = Counter(label for label in labels if label is not None)
    keep = [i for i, label in enumerate(labels) if label is not None and counts[label] >= MIN_CLASS_IMAGES]
    kept_labels = [labels[i] for i in keep]
    if len(set(kept_labels)) < 2:
        return UNSCORED
    y, _ = encode_labels(kept_labels)  # type: ignore[arg-type]
    x = features[keep].cpu()
    knn, k = loo_knn_accuracy(x, y)
    accuracy, folds = linear_probe_cv_accuracy(x, y) if linear else (None, 0)
    chance = max(Counter(kept_labels).values()) / len(kept_labels)
    return ProbeScore(knn, accuracy, k, folds, len(set(kept_labels)), len(keep), chance)


def pixel_features(images_u8: Tensor) -> Tensor:
    """The raw-pixel baseline: (N,3,S,S) uint8 at the training resolution -> (N, 3*S*S), unit norm."""
    return F.normalize(images_u8.reshape(len(images_u8), -1).float(), dim=1)
