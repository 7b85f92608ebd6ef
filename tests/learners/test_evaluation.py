"""kNN, linear CKA, linear probe, embedding and label encoding on synthetic data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learners.evaluation import (
    embed,
    encode_labels,
    knn_accuracy,
    knn_predict,
    linear_cka,
    linear_probe_accuracy,
)


def clusters(n_per_class: int, classes: int, dim: int, spread: float, noise_seed: int):
    """Unit-norm points around ``classes`` fixed random centres, and their labels."""
    centres = F.normalize(
        torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)), dim=1
    )
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(noise_seed))
    return F.normalize(centres[labels] + spread * noise, dim=1), labels


def test_knn_separates_clusters_and_is_at_chance_on_random_labels():
    train_x, train_y = clusters(40, 5, 32, 0.1, noise_seed=1)
    test_x, test_y = clusters(20, 5, 32, 0.1, noise_seed=2)
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    gen = torch.Generator().manual_seed(3)
    noise_x = F.normalize(torch.randn(2000, 32, generator=gen), dim=1)
    noise_y = torch.randint(0, 4, (2000,), generator=gen)
    acc = knn_accuracy(noise_x[:1000], noise_y[:1000], noise_x[1000:], noise_y[1000:])
    assert acc == pytest.approx(0.25, abs=0.05)


def test_knn_votes_are_similarity_weighted():
    train_x = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    train_y = torch.tensor([0, 1, 1])
    query = F.normalize(torch.tensor([[1.0, 0.2]]), dim=1)
    # with k=3 two far class-1 votes lose to one near class-0 vote at T=0.07 ...
    assert knn_predict(train_x, train_y, query, k=3, temperature=0.07).tolist() == [0]
    # ... but win when the temperature flattens the weights to a plain majority
    assert knn_predict(train_x, train_y, query, k=3, temperature=100.0).tolist() == [1]


def test_knn_handles_k_larger_than_the_training_set_and_chunks():
    train_x, train_y = clusters(2, 3, 8, 0.05, noise_seed=1)
    assert knn_accuracy(train_x, train_y, train_x, train_y, k=200) == 1.0
    test_x, test_y = clusters(30, 3, 8, 0.05, noise_seed=2)
    chunked = knn_predict(train_x, train_y, test_x, k=3, chunk_size=7)
    torch.testing.assert_close(chunked, knn_predict(train_x, train_y, test_x, k=3))


def test_cka_identity_invariances_and_independence():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen)
    assert linear_cka(x, x) == pytest.approx(1.0)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(200, 8, generator=gen)) < 0.15
    assert 0.2 < linear_cka(x, x[:, :4]) < 0.9  # partly shared representation
    with pytest.raises(ValueError):
        linear_cka(x, x[:10])


def test_linear_probe_on_separable_and_on_random_data():
    train_x, train_y = clusters(50, 4, 16, 0.1, noise_seed=1)
    test_x, test_y = clusters(25, 4, 16, 0.1, noise_seed=2)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == 1.0
    first = linear_probe_accuracy(train_x, train_y, test_x, test_y, epochs=5)
    assert first == linear_probe_accuracy(train_x, train_y, test_x, test_y, epochs=5)
    gen = torch.Generator().manual_seed(2)
    rand_x, rand_y = torch.randn(400, 16, generator=gen), torch.randint(0, 4, (400,), generator=gen)
    assert linear_probe_accuracy(rand_x[:200], rand_y[:200], rand_x[200:], rand_y[200:]) < 0.4


class Probe(nn.Module):
    """A net whose output depends on train/eval mode (BatchNorm) to catch the mode handling."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_embed_normalizes_in_eval_mode_without_grad_and_restores_the_mode():
    torch.manual_seed(0)
    model = Probe().train()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    seen = []

    def transform(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.dtype)
        return batch.float() / 255.0

    feats = embed(model, images, transform, batch_size=3)
    assert feats.shape == (10, 4) and feats.dtype == torch.float32 and not feats.requires_grad
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert model.training and seen == [torch.uint8] * 4
    model.eval()
    with torch.no_grad():
        expected = F.normalize(model(images.float() / 255.0), dim=1)
    torch.testing.assert_close(feats, expected)  # eval-mode output, batching irrelevant


def test_encode_labels_is_sorted_and_stable():
    ids, classes = encode_labels(["dog", "cat", "dog", "bird"])
    assert classes == ["bird", "cat", "dog"] and ids.tolist() == [2, 1, 2, 0]
    assert ids.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embed_and_knn_on_cuda():
    torch.manual_seed(0)
    model = Probe().cuda()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    feats = embed(model, images, lambda b: b.float() / 255.0)
    assert feats.device.type == "cpu"
    torch.testing.assert_close(
        feats, embed(model.cpu(), images, lambda b: b.float() / 255.0), atol=1e-4, rtol=1e-4
    )
    train_x, train_y = clusters(20, 3, 16, 0.1, noise_seed=1)
    test_x, test_y = clusters(10, 3, 16, 0.1, noise_seed=2)
    assert knn_accuracy(train_x.cuda(), train_y.cuda(), test_x.cuda(), test_y) == 1.0
