"""Stored experiences as an Avalanche benchmark, to run Avalanche's strategies on them.

Usage (needs the optional ``avalanche-lib``; ``pip install tailord[avalanche]``)::

    bench = to_avalanche_benchmark(images_u8, experience_ids, labels, probe_mask)
    for exp in bench.train_stream:
        strategy.train(exp)
        strategy.eval(bench.test_stream)

Samples stay as given (e.g. uint8 (3,S,S)): convert or attach an Avalanche
transform before training. Every sample gets task label 0 (one head, no task ids).
Avalanche writes ``~/.avalanche/config.json`` on import; point ``HOME`` at a
writable directory in read-only containers.

References: Lomonaco et al. 2021 (Avalanche), ``benchmark_from_datasets`` in avalanche-lib 0.6.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

if TYPE_CHECKING:
    from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
    from avalanche.benchmarks.utils import TaskAwareSupervisedClassificationDataset

UNLABELED = -1
"""Target given to samples without a label (stored SSL data usually has none)."""


def to_avalanche_benchmark(
    images: Tensor,
    experiences: Tensor,
    labels: Tensor | None = None,
    probe: Tensor | None = None,
) -> CLScenario:
    """One train experience per distinct id in ``experiences`` (ascending), from the
    non-probe samples; with a ``probe`` mask, a test stream of each experience's
    probe samples too. ``labels`` default to ``UNLABELED``.
    """
    if labels is None:
        labels = torch.full((len(images),), UNLABELED, dtype=torch.long)
    if probe is None:
        probe = torch.zeros(len(images), dtype=torch.bool)
    if not len(images) == len(experiences) == len(labels) == len(probe):
        raise ValueError("images, experiences, labels and probe must have the same length")
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    streams: dict[str, list[TaskAwareSupervisedClassificationDataset]] = {"train": [], "test": []}
    for exp_id in experiences.unique(sorted=True).tolist():
        in_exp = experiences == exp_id
        streams["train"].append(_dataset(images[in_exp & ~probe], labels[in_exp & ~probe]))
        streams["test"].append(_dataset(images[in_exp & probe], labels[in_exp & probe]))
    if not probe.any():
        del streams["test"]
    return benchmark_from_datasets(**streams)


def _dataset(images: Tensor, labels: Tensor) -> TaskAwareSupervisedClassificationDataset:
    """An Avalanche dataset yielding ``(image, label, task_label=0)``."""
    from avalanche.benchmarks.utils import DataAttribute, TaskAwareSupervisedClassificationDataset

    labels = labels.long()
    tasks = torch.zeros(len(labels), dtype=torch.long)
    return TaskAwareSupervisedClassificationDataset(
        [TensorDataset(images, labels)],
        data_attributes=[
            DataAttribute(labels, "targets"),
            DataAttribute(tasks, "targets_task_labels", use_in_getitem=True),
        ],
    )
