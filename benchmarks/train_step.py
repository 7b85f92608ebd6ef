"""Bare SSL train-step throughput (images/s) of ``learners.TrainStep`` vs a plain eager loop.

The uint8 batch is already in memory (no decoding, no Kafka): this measures
augmentation + forward + backward + optimizer step only. Two loops run the
same model, method, loss and optimizer on the same data:

- ``tailord``: ``TrainStep`` with vectorized per-image augmentation on the
  training device (``BatchAugment``), channels_last, bf16 autocast on CUDA,
  one host sync per step; optionally ``torch.compile`` (``--compile``).
- ``baseline``: what a straightforward user writes to get per-image random
  views: torchvision ``transforms.v2`` applied image by image in a Python
  loop on the CPU, then the batch moved to the device; default (contiguous)
  memory format, fp32, no compile.

The last line of output is one JSON object::

    {"preset", "method", "device", "images_per_second", "baseline_images_per_second",
     "speedup", "threads", ...}

Example: ``python benchmarks/train_step.py --preset cpu --method simsiam --steps 20``.
On a shared machine other processes lower both numbers; report the load
(``loadavg_1m``) with them.

``--backbone NAME`` measures another registered backbone with the kwargs the daemon would
give it for ``TAILORD_BACKBONE=NAME`` under the preset (``deploy.learner.backbone_choice``:
its defaults for the preset's resolution, e.g. the small ResNet stem or a patch-4 ViT at
32 px); ``--backbone all`` measures each in turn, one JSON line each, then a last line
``{"backbones": {name: images_per_second}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from deploy.learner import backbone_choice
from deploy.settings import Settings
from learners.augment import IMAGENET_MEAN, IMAGENET_STD, BatchAugment
from learners.backbones import BACKBONES, build_backbone
from learners.device import default_amp, pick_device, use_channels_last
from learners.methods import build_method
from learners.presets import PRESETS, Preset
from learners.train_step import TrainStep, build_optimizer


def backbone_spec(preset: Preset, name: str | None, overrides: dict) -> tuple[str, dict]:
    """Registry name and kwargs the daemon builds for ``TAILORD_BACKBONE=name`` (None: the
    preset's) and ``TAILORD_BACKBONE_KWARGS=overrides``, so the benchmark times that model."""
    settings = Settings.model_construct(backbone=name, backbone_kwargs=overrides)  # no env, no .env
    return backbone_choice(settings, preset)


def build(preset: Preset, method_name: str, backbone: tuple[str, dict]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(method_name, build_backbone(*backbone))


def images_per_second(
    step: Callable[[], object], images: int, steps: int, warmup: int, device: torch.device
) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images * steps / (time.perf_counter() - start)


def tailord_loop(
    args: argparse.Namespace,
    preset: Preset,
    device: torch.device,
    batch: torch.Tensor,
    compile_model: bool,
) -> float:
    method = build(preset, args.method, args.spec)
    if compile_model:
        method.compile()
    step = TrainStep(
        method,
        BatchAugment(preset.resolution),
        build_optimizer(method, preset),
        device,
        amp=default_amp(device),
        channels_last=use_channels_last(device),
    )
    return images_per_second(lambda: step(batch), len(batch), args.steps, args.warmup, device)


def baseline_loop(
    args: argparse.Namespace, preset: Preset, device: torch.device, batch: torch.Tensor
) -> float:
    method = build(preset, args.method, args.spec).to(device)
    optimizer = build_optimizer(method, preset)
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(preset.resolution, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    images = batch.cpu()

    def step() -> float:
        v1 = torch.stack([transform(img) for img in images]).to(device)
        v2_ = torch.stack([transform(img) for img in images]).to(device)
        optimizer.zero_grad()
        loss = method(v1, v2_).loss
        loss.backward()
        optimizer.step()
        method.after_step()
        return loss.item()

    return images_per_second(step, len(batch), args.steps, args.warmup, device)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--method", choices=["simsiam", "byol", "simclr", "moco"], default="simclr")
    parser.add_argument(
        "--backbone",
        choices=[*sorted(BACKBONES), "all"],
        default=None,
        help="registered backbone to time (default: the preset's); all: each in turn",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="side of the stored uint8 images (default: the preset resolution)",
    )
    parser.add_argument(
        "--backbone-kwargs",
        type=json.loads,
        default={},
        help="JSON overrides of the backbone's kwargs, e.g. '{\"width\": 64}'",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the method")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain eager loop")
    return parser.parse_args()


def measure(args: argparse.Namespace, preset: Preset, device: torch.device, batch: torch.Tensor) -> dict:
    """Times the tailord step (and the baseline unless --no-baseline) for ``args.spec``."""
    compile_status = "off"
    if args.compile:
        try:
            ips = tailord_loop(args, preset, device, batch, compile_model=True)
            compile_status = "ok"
        except Exception as exc:  # report and fall back to eager: compile is optional
            compile_status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            torch._dynamo.reset()
            ips = tailord_loop(args, preset, device, batch, compile_model=False)
    else:
        ips = tailord_loop(args, preset, device, batch, compile_model=False)
    base = None if args.no_baseline else baseline_loop(args, preset, device, batch)
    backbone = build_backbone(*args.spec)
    return {
        "preset": preset.name,
        "method": args.method,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "backbone": args.spec[0],
        "images_per_second": round(ips, 1),
        "baseline_images_per_second": None if base is None else round(base, 1),
        "speedup": None if base is None else round(ips / base, 2),
        "threads": torch.get_num_threads(),
        "batch_size": preset.batch_size,
        "resolution": preset.resolution,
        "backbone_kwargs": args.spec[1],
        "feature_dim": backbone.feature_dim,
        "backbone_parameters_m": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 2),
        "amp": default_amp(device),
        "channels_last": use_channels_last(device),
        "compile": compile_status,
        "steps": args.steps,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    args = parse_args()
    preset = PRESETS[args.preset]
    device = pick_device(args.device)
    size = args.input_size or preset.resolution
    batch = torch.randint(
        0,
        256,
        (preset.batch_size, 3, size, size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    if device.type == "cuda":
        batch = batch.pin_memory()

    names = sorted(BACKBONES) if args.backbone == "all" else [args.backbone]
    results = {}
    for name in names:
        args.spec = backbone_spec(preset, name, args.backbone_kwargs)
        result = measure(args, preset, device, batch)
        results[result["backbone"]] = result["images_per_second"]
        print(json.dumps(result), flush=True)
    if len(names) > 1:
        print(json.dumps({"preset": preset.name, "method": args.method, "device": result["device"],
                          "backbones": results, "steps": args.steps,
                          "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
