"""learners.sept: SEPT's training loop bounds its steps and shuffles with its own generator."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from learners.sept import continue_pretraining


class RecordingStep:
    """A stand-in TrainStep recording the batches it is given; `skip` marks steps as skipped."""

    def __init__(self, skip: set[int] | None = None) -> None:
        self.batches: list[torch.Tensor] = []
        self.skip = skip or set()

    def __call__(self, images: torch.Tensor) -> SimpleNamespace:
        self.batches.append(images[:, 0, 0, 0].clone())
        return SimpleNamespace(skipped=len(self.batches) - 1 in self.skip)


def images(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()


def test_steps_stop_at_max_steps_and_skip_single_image_batches() -> None:
    step = RecordingStep(skip={1})
    done = continue_pretraining(step, images(9), batch_size=4, epochs=10, max_steps=5)  # batches 4, 4, 1
    assert len(step.batches) == 5 and all(len(b) == 4 for b in step.batches)
    assert done == 4  # one step was skipped (a non-finite loss)


def test_batch_order_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = RecordingStep(), RecordingStep()
    continue_pretraining(first, images(8), batch_size=4, epochs=2, seed=7)
    continue_pretraining(second, images(8), batch_size=4, epochs=2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.batches, second.batches, strict=True))
    assert torch.equal(torch.get_rng_state(), before)
