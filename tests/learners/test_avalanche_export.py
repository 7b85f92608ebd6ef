"""Stored experiences -> Avalanche benchmark, and an Avalanche strategy trained on it."""

from __future__ import annotations

import pytest
import torch

from learners.avalanche_export import UNLABELED, to_avalanche_benchmark


@pytest.fixture
def avalanche(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # Avalanche writes ~/.avalanche/config.json
    return pytest.importorskip("avalanche", reason="avalanche-lib (extra 'dev') not installed")


def data():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(30, 3, 4, 4, generator=gen)
    experiences = torch.tensor([2, 0, 1] * 10)  # ids need not be contiguous in storage order
    labels = torch.arange(30) % 3
    probe = torch.arange(30) >= 24
    return images, experiences, labels, probe


def test_one_train_and_one_probe_experience_per_id(avalanche):
    images, experiences, labels, probe = data()
    bench = to_avalanche_benchmark(images, experiences, labels, probe)
    train, test = list(bench.train_stream), list(bench.test_stream)
    assert [e.current_experience for e in train] == [0, 1, 2]
    assert [len(e.dataset) for e in train] == [8, 8, 8] and [len(e.dataset) for e in test] == [
        2,
        2,
        2,
    ]
    x, y, task = train[1].dataset[0]
    first = torch.nonzero((experiences == 1) & ~probe)[0].item()  # experience id 1, in order
    torch.testing.assert_close(x, images[first])
    assert (int(y), task) == (int(labels[first]), 0)
    assert list(train[2].dataset.targets) == labels[(experiences == 2) & ~probe].tolist()


def test_label_free_and_probe_free_data(avalanche):
    images, experiences, _, _ = data()
    bench = to_avalanche_benchmark(images, experiences)
    assert not hasattr(bench, "test_stream")
    assert set(bench.train_stream[0].dataset.targets) == {UNLABELED}
    with pytest.raises(ValueError, match="same length"):
        to_avalanche_benchmark(images, experiences[:5])


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_an_avalanche_strategy_trains_on_it(avalanche):
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    images, experiences, labels, probe = data()
    bench = to_avalanche_benchmark(images, experiences, labels, probe)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    before = model[1].weight.detach().clone()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=4,
        eval_mb_size=4,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    strategy.train(bench.train_stream[0])
    assert not torch.equal(before, model[1].weight)
