"""Experience-end evaluation: one row of the accuracy matrix, CKA drift and probe SSL loss.

kNN accuracy on a probe set uses the probe set itself as the memory bank, in two folds
(even indices as bank for odd queries and vice versa), so no image votes for itself and
no training image or label is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deploy.learner import Learner
from deploy.probes import ProbeSet
from learners.evaluation import embed, encode_labels, knn_accuracy, linear_cka
from learners.train_step import ssl_loss

KNN_K = 20
KNN_T = 0.07


@dataclass
class EvalRow:
    """Results on probe sets 1..i after experience i, in experience order."""

    accuracy: list[float | None]
    cka: list[float | None]
    probe_loss: list[float | None]


def two_fold_knn(features: torch.Tensor, labels: list[str]) -> float:
    """Weighted kNN accuracy (k=20, T=0.07) with each half as the other half's bank."""
    y, _ = encode_labels(labels)
    even, odd = torch.arange(0, len(y), 2), torch.arange(1, len(y), 2)
    acc_odd = knn_accuracy(features[even], y[even], features[odd], y[odd], k=KNN_K, temperature=KNN_T)
    acc_even = knn_accuracy(features[odd], y[odd], features[even], y[even], k=KNN_K, temperature=KNN_T)
    return (acc_odd * len(odd) + acc_even * len(even)) / len(y)


def evaluate_row(learner: Learner, probe_sets: dict[int, ProbeSet], experience: int,
                 features_dir: Path) -> EvalRow:
    """Evaluate every finished probe set j <= `experience` with the current encoder.

    The features of probe set `experience` are saved as its reference for later CKA.
    """
    features_dir.mkdir(parents=True, exist_ok=True)
    row = EvalRow([], [], [])
    for j in range(1, experience + 1):
        probes = probe_sets.get(j)
        if probes is None or len(probes) < 2:
            row.accuracy.append(None)
            row.cka.append(None)
            row.probe_loss.append(None)
            continue
        images = probes.stacked()
        feats = embed(learner.backbone, images, learner.eval_transform, device=learner.device).cpu()
        ref_path = features_dir / f"exp-{j:06d}.safetensors"
        if j == experience:
            try:
                save_file({"features": feats.contiguous()}, str(ref_path))
            except Exception:  # disk full: this row still gets accuracy and loss, CKA waits
                ref_path.unlink(missing_ok=True)
        row.accuracy.append(two_fold_knn(feats, probes.labels) if probes.labelled and len(probes) >= 4 else None)
        row.cka.append(linear_cka(feats, load_file(str(ref_path))["features"]) if ref_path.is_file() else None)
        row.probe_loss.append(probe_ssl_loss(learner, images))
    return row


@torch.no_grad()
def probe_ssl_loss(learner: Learner, images: torch.Tensor, batch: int = 256) -> float:
    """Mean SSL loss on probe images (fixed seed, so rows are comparable over time)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    was_training = learner.method.training
    learner.method.eval()
    losses = []
    try:
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch].to(learner.device)
            if len(chunk) >= 2:
                losses.append(float(ssl_loss(learner.method, learner.augment, chunk)))
    finally:
        learner.method.train(was_training)
        torch.random.set_rng_state(generator_state)
    return sum(losses) / len(losses) if losses else float("nan")
