"""Label-aware and label-free probes of a representation: kNN, linear probe, CKA.

Usage::

    feats = embed(backbone, images_u8, transform=normalize)        # (N, D), unit norm
    acc = knn_accuracy(train_feats, train_y, test_feats, test_y)   # k=20, T=0.07
    drift = 1 - linear_cka(feats_before, feats_after)              # label-free

References: Wu et al. 2018 (InstDisc weighted kNN), Caron et al. 2021 (DINO kNN eval),
Kornblith et al. 2019 (linear CKA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def embed(
    backbone: nn.Module,
    images_u8: Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """Features of uint8 images (N,3,S,S) as float32 (N,D) on the CPU, L2-normalized.

    ``transform`` maps a uint8 batch (on ``device``) to the backbone's float input.
    Runs in eval mode without grad, then restores the backbone's previous mode.
    ``device`` defaults to the backbone's.
    """
    if device is None:
        device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(images_u8), batch_size):
                batch = images_u8[start : start + batch_size].to(device, non_blocking=True)
                features = backbone(transform(batch)).float()
                chunks.append(F.normalize(features, dim=1).cpu())
    finally:
        backbone.train(was_training)
    if not chunks:
        raise ValueError("embed needs at least one image")
    return torch.cat(chunks)


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted-kNN class predictions (int64, one per test row).

    Each of the ``min(k, N_train)`` nearest training samples (cosine similarity
    ``s``; features assumed normalized) votes for its class with weight
    ``exp(s / temperature)``; the class with the largest total wins.
    """
    if len(train_feats) == 0:
        raise ValueError("kNN needs at least one training sample")
    train_feats = train_feats.float()
    train_labels = train_labels.long().to(train_feats.device)
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    predictions = []
    for start in range(0, len(test_feats), chunk_size):
        sims = test_feats[start : start + chunk_size].to(train_feats) @ train_feats.T  # float32
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, dtype=sims.dtype, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Fraction of test samples whose weighted-kNN prediction (``knn_predict``) is right."""
    if len(test_feats) == 0:
        raise ValueError("kNN accuracy needs at least one test sample")
    predicted = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return (predicted.cpu() == test_labels.long().cpu()).float().mean().item()


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA between two representations of the same N inputs, in [0, 1].

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``;
    invariant to orthogonal transforms and isotropic scaling of either side.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"CKA needs the same N >= 2 rows, got {len(x)} and {len(y)}")
    x = x.double() - x.double().mean(dim=0)
    y = y.double() - y.double().mean(dim=0)
    cross = (y.T @ x).norm().pow(2)
    denominator = (x.T @ x).norm() * (y.T @ y).norm()
    return (cross / denominator).item() if denominator > 0 else 0.0


def linear_probe_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    num_classes: int | None = None,
) -> float:
    """Test accuracy of a multinomial logistic regression fit on frozen features.

    Full-batch L-BFGS (``epochs`` iterations, strong-Wolfe line search) from zero
    weights with L2 ``weight_decay``: a convex fit, so deterministic on a device.
    """
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("a linear probe needs training and test samples")
    train_labels = train_labels.long().cpu()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    x = train_feats.float().cpu()
    probe = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(
        probe.parameters(), lr=lr, max_iter=epochs, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), train_labels) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = probe(test_feats.float().cpu()).argmax(dim=1)
    return (predicted == test_labels.long().cpu()).float().mean().item()


def encode_labels(labels: list[str]) -> tuple[Tensor, list[str]]:
    """String labels -> (int64 ids, classes); ids index the sorted distinct labels."""
    classes = sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    return torch.tensor([index[label] for label in labels], dtype=torch.long), classes
