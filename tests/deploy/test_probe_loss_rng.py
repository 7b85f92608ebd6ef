"""probe_ssl_loss draws its views from a private generator: the training RNG stream is never touched."""

from __future__ import annotations

import pytest
import torch

import deploy.evaluate as evaluate
from deploy.evaluate import probe_ssl_loss
from deploy.learner import build_learner
from deploy.settings import Settings

SIZE = 16


@pytest.fixture(scope="module")
def learner():
    return build_learner(Settings(preset="cpu", device="cpu", method="simclr", resolution=SIZE, batch_size=8, seed=0))


def images(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def test_the_global_rng_is_not_reseeded_even_during_the_call(learner, monkeypatch) -> None:
    """Another thread (an HTTP snapshot, the indexer) drawing meanwhile must not see a reseeded RNG."""
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    seen = []
    real = evaluate.ssl_loss

    def spy(*args, generator=None, **kwargs):
        seen.append((torch.equal(torch.random.get_rng_state(), before), generator))
        return real(*args, generator=generator, **kwargs)

    monkeypatch.setattr(evaluate, "ssl_loss", spy)
    probe_ssl_loss(learner, images(), batch=4)
    assert len(seen) == 3
    assert all(untouched for untouched, _ in seen)
    assert all(isinstance(generator, torch.Generator) for _, generator in seen)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_the_loss_is_repeatable_and_independent_of_the_global_rng(learner) -> None:
    torch.manual_seed(1)
    first = probe_ssl_loss(learner, images())
    torch.manual_seed(2)
    assert probe_ssl_loss(learner, images()) == first
    assert probe_ssl_loss(learner, images(), seed=7) != first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_rng_is_untouched() -> None:
    cuda = build_learner(Settings(preset="cpu", device="cuda", method="simclr", resolution=SIZE, batch_size=8))
    torch.cuda.manual_seed_all(42)
    before = torch.cuda.get_rng_state()
    cpu_before = torch.random.get_rng_state()
    probe_ssl_loss(cuda, images())
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert torch.equal(torch.random.get_rng_state(), cpu_before)
