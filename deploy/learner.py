"""Builds the learner (backbone, SSL method, augmentation, regularizer, optimizer, train step)
from the settings, and moves its state in and out of checkpoints."""

from __future__ import annotations

import hashlib
import io
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from torch import nn

from deploy.batches import standin
from deploy.errors import UsageError
from deploy.settings import Settings
from deploy.world import World
from learners.augment import BatchAugment, EvalTransform
from learners.backbones import HEAD_PREFIXES, build_backbone, input_defaults
from learners.device import pick_device
from learners.methods import build_method
from learners.presets import PRESETS, Preset
from learners.regularizers import Regularizer, build_regularizer, parse_strategy
from learners.snapshot import backbone_spec
from learners.train_step import LinearWarmup, TrainStep, build_optimizer, build_scheduler
from replay.balanced import BalancedBuffer
from replay.buffer import ReservoirBuffer

log = structlog.get_logger()


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
    init_weights: dict | None = None  # {"file", "sha256"} of TAILORD_INIT_WEIGHTS this run started from

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone

    def describe(self) -> dict:
        """What a manifest records about the model (enough to rebuild the backbone)."""
        return {
            "preset": self.preset.name,
            # the effective recipe (TAILORD_LR / TAILORD_BATCH_SIZE over the preset): what SEPT continues with
            "training": {"lr": self.preset.lr, "batch_size": self.preset.batch_size},
            "method": type(self.method).__name__.lower(),
            "backbone": backbone_spec(self.backbone),
            "init_weights": self.init_weights,  # null: trained from random init
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


def trained_preset(manifest: dict) -> Preset:
    """The preset a checkpoint trained with: its input resolution and effective lr and batch size
    (checkpoints from before these were recorded get the named preset's)."""
    preset = PRESETS[manifest["preset"]]
    resolution = manifest.get("input", {}).get("resolution", preset.resolution)
    return replace(preset, resolution=resolution, **manifest.get("training", {}))


def backbone_choice(settings: Settings, preset: Preset) -> tuple[str, dict[str, Any]]:
    """The backbone's registry name and kwargs: `TAILORD_BACKBONE` (else the preset's); kwargs are the
    backbone's defaults for the preset's resolution, then the preset's own (when it is the preset's
    backbone), then `TAILORD_BACKBONE_KWARGS`."""
    name = settings.backbone or preset.backbone
    kwargs = input_defaults(name, preset.resolution)
    if name == preset.backbone:
        kwargs.update(preset.backbone_kwargs)
    kwargs.update(settings.backbone_kwargs or {})
    return name, kwargs


def check_backbone(manifest: dict, backbone: nn.Module, state_dir: Path | str = "the state dir") -> None:
    """UsageError (one line) unless the checkpoint `manifest` was trained with `backbone`'s name and
    kwargs (its full `config()`): a state dir keeps the backbone it started with."""
    stored = manifest.get("backbone", {})
    name, kwargs = backbone_spec(backbone)["name"], backbone.config()
    if stored.get("name") == name and stored.get("kwargs", {}) == kwargs:
        return
    raise UsageError(
        f"{state_dir} was trained with backbone {stored.get('name')!r} {stored.get('kwargs', {})}, but "
        f"{name!r} {kwargs} is configured: set TAILORD_BACKBONE/TAILORD_BACKBONE_KWARGS (or the preset) "
        f"back to the stored one, or start a new state dir (TAILORD_STATE_DIR=<new folder>)")


def headless_state(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """`state` mapped onto a headless backbone: `module.` (DDP) and `backbone.` (SSL method) prefixes
    stripped, classification-head keys (fc./heads./classifier.) dropped unless the backbone has them
    (ConvNeXt keeps its classifier LayerNorm)."""
    own = set(backbone.state_dict())
    mapped = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if key.startswith(HEAD_PREFIXES) and key not in own:
            continue
        mapped[key] = value
    return mapped


def load_init_weights(backbone: nn.Module, path: Path) -> dict:
    """Load starting weights from `path` (.safetensors, else a torch state dict read with
    weights_only=True) into `backbone`; returns {"file", "sha256"} for the manifests.

    UsageError (one line) for an unreadable file or keys that do not fit, listing them."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]  # a training checkpoint holding the weights
    except Exception as exc:  # OSError, safetensors/pickle errors
        raise UsageError(f"TAILORD_INIT_WEIGHTS={path}: cannot read weights ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"TAILORD_INIT_WEIGHTS={path}: not a state dict of tensors")
    state = headless_state(state, backbone)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def shown(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = [f"{label} {shown(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)) if keys]
        raise UsageError(f"TAILORD_INIT_WEIGHTS={path} does not fit backbone {backbone_spec(backbone)['name']} "
                         f"{backbone.config()}: " + "; ".join(parts))
    backbone.load_state_dict(state)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest()}


def build_learner(settings: Settings, world: World | None = None, preset: Preset | None = None,
                  resume: dict | None = None) -> Learner:
    """A fresh learner for `settings` (weights from the seed; a checkpoint may overwrite them).

    `preset` replaces the one the settings name (benchmarks trying other recipes).
    `resume` is the manifest of the checkpoint the run will resume from (None: a fresh state dir).
    A resumed run must have that checkpoint's backbone (else UsageError, before any weights load)
    and ignores `TAILORD_INIT_WEIGHTS`; a fresh one starts from those weights when set.

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
    name, kwargs = backbone_choice(settings, preset)
    try:
        backbone = build_backbone(name, kwargs)
    except ValueError as exc:
        raise UsageError(f"TAILORD_BACKBONE={name}: {exc}") from None
    if resume is not None:
        check_backbone(resume, backbone, settings.state_dir)
    if getattr(backbone, "image_size", preset.resolution) != preset.resolution:
        raise UsageError(f"backbone {name} takes {backbone.image_size} px images but the resolution is "
                         f"{preset.resolution}: set TAILORD_BACKBONE_KWARGS image_size or TAILORD_RESOLUTION")
    init_weights = None
    if resume is not None:
        init_weights = resume.get("init_weights")
        if settings.init_weights is not None:
            log.info("init_weights_ignored", file=str(settings.init_weights),
                     note="resuming from a checkpoint; starting weights apply to a fresh state dir only")
    elif settings.init_weights is not None:  # before the method copies the backbone (BYOL/MoCo targets)
        init_weights = load_init_weights(backbone, settings.init_weights)
        log.info("init_weights_loaded", **init_weights)
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
                   scheduler, init_weights)


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


def build_buffer(settings: Settings) -> ReservoirBuffer | BalancedBuffer:
    """The replay buffer named by the settings."""
    kind = BalancedBuffer if settings.replay_buffer == "balanced" else ReservoirBuffer
    return kind(settings.replay_max_images, settings.replay_max_bytes, seed=settings.seed)


def paired_views(learner: Learner, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Two augmented views of each recent batch, concatenated: (2B,3,R,R) per batch."""
    with torch.no_grad():
        out = []
        for images in batches:
            images = images.to(learner.device)
            out.append(torch.cat([learner.augment(images), learner.augment(images)]))
        return out


def paired_views_loss(learner: Learner):
    """The SSL loss of a `paired_views` batch (first half vs second half), for Fisher/MAS."""
    def loss(views: torch.Tensor) -> torch.Tensor:
        half = len(views) // 2
        return learner.method(views[:half], views[half:]).loss
    return loss


def update_regularizer(learner: Learner, recent: deque[torch.Tensor], world: World) -> None:
    """The regularizer's experience-end statistics (Fisher, anchors...) from the recent batches.

    With several ranks each estimates them on its own batches and the ranks average them,
    so every rank holds the same state (a rank that saw no data uses a blank stand-in).
    """
    batches = list(recent)
    if not batches and not world.distributed:
        return
    if not batches:
        batches = [standin(recent, learner.preset.resolution)]
    learner.regularizer.on_experience_end(learner.backbone, paired_views_loss(learner), paired_views(learner, batches))
    if world.distributed:
        state = world.average_state(learner.regularizer.state_dict())
        learner.regularizer.load_state_dict(state, backbone=learner.backbone)


def weights_digest(learner: Learner) -> str:
    """sha256 of the model's parameters (ranks of one DDP run must log the same digest).

    BatchNorm running statistics are left out: DDP copies rank 0's at the start of each
    forward, so after the last step each rank holds its own (checkpoints keep rank 0's).
    """
    digest = hashlib.sha256()
    for key, value in sorted(learner.method.named_parameters()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
