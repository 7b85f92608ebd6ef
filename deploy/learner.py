"""Builds the learner (backbone, SSL method, augmentation, regularizer, optimizer, train step)
from the settings, and moves its state in and out of checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deploy.settings import Settings
from deploy.world import World
from learners.augment import BatchAugment, EvalTransform
from learners.backbones import ResNet18
from learners.device import pick_device
from learners.methods import build_method
from learners.presets import PRESETS, Preset
from learners.regularizers import Regularizer, build_regularizer, parse_strategy
from learners.train_step import LinearWarmup, TrainStep, build_optimizer, build_scheduler


@dataclass
class Learner:
    """Everything that trains, on one device."""

    preset: Preset
    device: torch.device
    method: nn.Module
    augment: BatchAugment
    eval_transform: EvalTransform
    regularizer: Regularizer | None
    optimizer: torch.optim.Optimizer
    step: TrainStep
    use_replay: bool
    scheduler: LinearWarmup | None = None  # the lr warmup (preset.warmup_steps), stepped by `step`

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone

    def describe(self) -> dict:
        """What a manifest records about the model (enough to rebuild the backbone)."""
        return {
            "preset": self.preset.name,
            "method": type(self.method).__name__.lower(),
            "backbone": {"name": "resnet18", "class": "learners.backbones.ResNet18",
                         "kwargs": self.backbone.config()},
            "input": {"resolution": self.preset.resolution, "mean": list(self.eval_transform.mean.flatten().tolist()),
                      "std": list(self.eval_transform.std.flatten().tolist())},
        }


def resolve_preset(settings: Settings, device: torch.device) -> Preset:
    """The preset named by the settings (auto: gpu on CUDA), with explicit overrides applied."""
    name = settings.preset if settings.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    overrides = {k: v for k, v in (("batch_size", settings.batch_size), ("resolution", settings.resolution),
                                   ("lr", settings.lr)) if v is not None}
    return replace(preset, **overrides)


def build_learner(settings: Settings, world: World | None = None, preset: Preset | None = None) -> Learner:
    """A fresh learner for `settings` (weights from the seed; a checkpoint may overwrite them).

    `preset` replaces the one the settings name (benchmarks trying other recipes).

    In a DDP `world` each rank trains on its local GPU (or the CPU) and the method runs
    under DistributedDataParallel, which starts every rank from rank 0's weights.
    """
    world = world or World()
    torch.manual_seed(settings.seed)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    preset = preset or resolve_preset(settings, device)
    backbone = ResNet18(**preset.backbone_kwargs)
    method_kwargs = {"temperature": preset.simclr_temperature} \
        if settings.method == "simclr" and preset.simclr_temperature is not None else {}
    method = build_method(settings.method, backbone, **method_kwargs).to(device)
    use_replay, reg_name = parse_strategy(settings.strategy)
    regularizer = build_regularizer(reg_name, settings.regularizer_lambda, feature_dim=backbone.feature_dim) \
        if reg_name else None
    if regularizer is not None:
        regularizer.to(device)
    extra = list(regularizer.parameters()) if regularizer is not None else []
    optimizer = build_optimizer(method, preset, extra_params=extra)
    scheduler = build_scheduler(optimizer, preset)
    augment = BatchAugment(preset.resolution).to(device)
    eval_transform = EvalTransform(preset.resolution).to(device)
    amp = device.type == "cuda"
    step = TrainStep(method, augment, optimizer, device, amp=amp, channels_last=True, regularizer=regularizer,
                     group=world if world.distributed else None, scheduler=scheduler)
    step.forward = world.wrap(method, device)  # same parameters; checkpoints keep using `method`
    if settings.compile:
        step.forward = torch.compile(step.forward)
    return Learner(preset, device, method, augment, eval_transform, regularizer, optimizer, step, use_replay,
                   scheduler)


def learner_writers(learner: Learner) -> dict:
    """Checkpoint file writers: model.safetensors, optimizer.pt, scheduler.pt (the warmup's
    position), regularizer.safetensors."""
    def write_model(path: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in learner.method.state_dict().items()}, str(path))

    def write_optimizer(path: Path) -> None:
        torch.save(learner.optimizer.state_dict(), path)

    writers = {"model.safetensors": write_model, "optimizer.pt": write_optimizer}
    if learner.scheduler is not None:
        def write_scheduler(path: Path) -> None:
            torch.save(learner.scheduler.state_dict(), path)
        writers["scheduler.pt"] = write_scheduler
    if learner.regularizer is not None:
        def write_regularizer(path: Path) -> None:
            state = {k: v.detach().contiguous() for k, v in learner.regularizer.state_dict().items()}
            save_file(state or {"_empty": torch.zeros(0)}, str(path))
        writers["regularizer.safetensors"] = write_regularizer
    return writers


def load_learner_state(learner: Learner, folder: Path) -> None:
    """Restore weights, optimizer, lr warmup and regularizer from a verified checkpoint folder.

    A checkpoint without scheduler.pt was written before the warmup existed (or by a preset
    without one): its encoder has trained already, so the warmup is skipped."""
    device = str(learner.device)
    learner.method.load_state_dict(load_file(str(folder / "model.safetensors"), device=device))
    optim_state = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
    learner.optimizer.load_state_dict(optim_state)
    if learner.scheduler is not None:
        scheduler_file = folder / "scheduler.pt"
        if scheduler_file.is_file():
            learner.scheduler.load_state_dict(torch.load(scheduler_file, map_location="cpu", weights_only=True))
        else:
            learner.scheduler.finish()
    reg_file = folder / "regularizer.safetensors"
    if learner.regularizer is not None and reg_file.is_file():
        state = {k: v for k, v in load_file(str(reg_file), device=device).items() if k != "_empty"}
        learner.regularizer.load_state_dict(state, backbone=learner.backbone)


def backbone_state(learner: Learner) -> dict[str, torch.Tensor]:
    """The backbone's weights alone, on the CPU (what a snapshot exports)."""
    return {k: v.detach().cpu().contiguous() for k, v in learner.backbone.state_dict().items()}
