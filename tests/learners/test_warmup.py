"""The lr warmup: linear to the preset's lr, then constant, and resumed from a checkpoint."""

import dataclasses

import pytest
import torch
from torch import nn

from learners.presets import PRESETS
from learners.train_step import LinearWarmup, build_optimizer, build_scheduler


def _optimizer(lr: float = 0.4) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def test_linear_warmup_at_start_middle_and_after():
    optimizer = _optimizer(0.4)
    warmup = LinearWarmup(optimizer, steps=10)
    lrs = []
    for _ in range(15):
        lrs.append(_lr(optimizer))  # the lr the next optimizer step uses
        optimizer.step()
        warmup.step()
    assert lrs[0] == pytest.approx(0.04)  # step 0: lr / steps, never 0
    assert lrs[4] == pytest.approx(0.2)  # half-way
    assert lrs[9] == pytest.approx(0.4)  # the last warmup step reaches the lr
    assert lrs[10:] == pytest.approx([0.4] * 5)  # then constant: no decay on an endless stream
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    with pytest.raises(ValueError, match="at least one step"):
        LinearWarmup(_optimizer(), steps=0)


def test_build_scheduler_follows_the_preset():
    none = dataclasses.replace(PRESETS["cpu"], warmup_steps=0)
    assert build_scheduler(build_optimizer(_Wrap(), none), none) is None
    preset = dataclasses.replace(PRESETS["cpu"], warmup_steps=4)
    optimizer = build_optimizer(_Wrap(), preset)
    scheduler = build_scheduler(optimizer, preset)
    assert isinstance(scheduler, LinearWarmup) and scheduler.steps == 4
    assert _lr(optimizer) == pytest.approx(preset.lr * preset.batch_size / 256 / 4)


class _Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)


def test_train_step_advances_the_warmup_only_when_it_updates():
    from learners.augment import BatchAugment
    from learners.backbones import ResNet18
    from learners.methods import build_method
    from learners.train_step import TrainStep

    torch.manual_seed(0)
    method = build_method("simclr", ResNet18(width=8, small_stem=True))
    preset = dataclasses.replace(PRESETS["cpu"], warmup_steps=5)
    optimizer = build_optimizer(method, preset)
    step = TrainStep(method, BatchAugment(16), optimizer, torch.device("cpu"), amp=False, channels_last=False,
                     scheduler=build_scheduler(optimizer, preset))
    full = preset.lr * preset.batch_size / 256
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    assert not step(images).skipped
    assert _lr(optimizer) == pytest.approx(full * 2 / 5) and step.scheduler.last_epoch == 1
    nan = torch.full((), float("nan"))

    class NaNPenalty:
        def penalty(self, backbone, views, features):
            return nan

    step.regularizer = NaNPenalty()
    assert step(images).skipped
    assert _lr(optimizer) == pytest.approx(full * 2 / 5) and step.scheduler.last_epoch == 1


def _learner(warmup_steps: int, seed: int = 0):
    from deploy.learner import build_learner
    from deploy.settings import Settings

    settings = Settings(preset="cpu", device="cpu", method="simclr", resolution=16, batch_size=4, seed=seed)
    preset = dataclasses.replace(PRESETS["cpu"], resolution=16, batch_size=4, warmup_steps=warmup_steps,
                                 simclr_temperature=0.3)
    return build_learner(settings, preset=preset)


def test_warmup_survives_a_checkpoint_round_trip(tmp_path):
    from deploy.learner import learner_writers, load_learner_state

    learner = _learner(warmup_steps=8)
    assert learner.step.scheduler is learner.scheduler
    assert learner.method.criterion.temperature == 0.3  # the preset's SimCLR temperature
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    for _ in range(3):
        assert not learner.step(images).skipped
    full = learner.preset.lr * learner.preset.batch_size / 256
    assert _lr(learner.optimizer) == pytest.approx(full * 4 / 8)

    writers = learner_writers(learner)
    assert "scheduler.pt" in writers
    for name, write in writers.items():
        write(tmp_path / name)
    fresh = _learner(warmup_steps=8, seed=1)
    assert _lr(fresh.optimizer) == pytest.approx(full / 8)
    load_learner_state(fresh, tmp_path)
    assert fresh.scheduler.last_epoch == 3 and fresh.scheduler.steps == 8
    assert _lr(fresh.optimizer) == pytest.approx(full * 4 / 8)  # resumed, not restarted
    for _ in range(5):
        fresh.step(images)
    assert _lr(fresh.optimizer) == pytest.approx(full)
    fresh.step(images)
    assert _lr(fresh.optimizer) == pytest.approx(full)


def test_a_checkpoint_from_before_the_warmup_skips_it(tmp_path):
    from deploy.learner import learner_writers, load_learner_state

    old = _learner(warmup_steps=0)
    assert old.scheduler is None and "scheduler.pt" not in learner_writers(old)
    old.step(torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8))
    for name, write in learner_writers(old).items():
        write(tmp_path / name)
    new = _learner(warmup_steps=8)
    load_learner_state(new, tmp_path)
    full = new.preset.lr * new.preset.batch_size / 256
    assert _lr(new.optimizer) == pytest.approx(full)
    new.step(torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8))
    assert _lr(new.optimizer) == pytest.approx(full)
