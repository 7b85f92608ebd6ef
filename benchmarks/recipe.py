"""Does a training recipe learn? The daemon's learner on digits + fashion, scored against its floors.

The stream is the built-in ``digits`` and ``fashion`` domains, decoded once at the preset's
resolution with the daemon's decoder (``benchmarks.continual.load_domain``), each with a
fixed, class-stratified probe set held out (``--probe-images`` per domain, the same for
every run). The rest of both domains is one i.i.d. stream: their union, reshuffled on
every pass (seeded). The daemon's learner (``deploy.learner.build_learner``, the preset
with the given overrides) trains on it for ``--images`` images, and the probe sets are
scored with the daemon's protocol (``learners.protocol.score_probes``: leave-one-out
weighted kNN, k <= 20, and a 5-fold cross-validated linear probe), in percent, for:

- ``pixels``: the raw pixels (``learners.protocol.pixel_features``);
- ``untrained``: the same learner at step 0 (same seed, so the exact initialisation);
- ``curve``: the trained learner every ``--eval-every`` images, the last point being the
  trained encoder (``trained``).

Progress goes to stderr; stdout is one JSON object::

    {"config": {...}, "pixels": {DOMAIN: {"knn", "linear"}}, "untrained": {...},
     "trained": {...}, "curve": [{"images", "steps", "seconds", "lr", "loss", DOMAIN: {...}}],
     "beats": {"untrained": {DOMAIN: {"knn", "linear"}}, "pixels": {...}}}

Examples::

    python benchmarks/recipe.py --images 48000                      # the cpu preset as is
    python benchmarks/recipe.py --images 48000 --lr 0.3 --temperature 0.2 --warmup-steps 75
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace

import torch

from benchmarks.continual import Domain, load_domain
from deploy.learner import Learner, build_learner
from deploy.settings import Settings
from learners.evaluation import embed
from learners.presets import PRESETS, Preset
from learners.protocol import pixel_features, score_probes

DOMAINS = ("digits", "fashion")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--method", default="simclr", help="simclr | simsiam | byol | moco")
    parser.add_argument("--images", type=int, default=48_000, help="training images (stream part)")
    parser.add_argument("--eval-every", type=int, default=12_000, help="images between curve points")
    parser.add_argument("--lr", type=float, default=None,
                        help="actual SGD learning rate (default: the preset's base lr x batch / 256)")
    parser.add_argument("--temperature", type=float, default=None, help="SimCLR temperature (default: preset)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: preset)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--probe-images", type=int, default=400, help="probe images per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-linear", action="store_true", help="kNN only on the curve's inner points")
    parser.add_argument("--floors-cache", default=None,
                        help="JSON file keeping the pixel and untrained scores, reused by later runs with the "
                             "same seed, backbone, resolution and probe sets (the pixel linear probe is slow)")
    return parser.parse_args(argv)


def recipe_preset(args: argparse.Namespace) -> Preset:
    """The preset with the command line's overrides; ``--lr`` (actual) becomes a base lr per 256."""
    preset = PRESETS[args.preset]
    if args.batch_size is not None:
        preset = replace(preset, batch_size=args.batch_size)
    if args.lr is not None:
        preset = replace(preset, lr=args.lr * 256 / preset.batch_size if preset.optimizer == "sgd" else args.lr)
    if args.temperature is not None:
        preset = replace(preset, simclr_temperature=args.temperature)
    if args.warmup_steps is not None:
        preset = replace(preset, warmup_steps=args.warmup_steps)
    return preset


def scores(features_of, domains: list[Domain], linear: bool = True) -> dict[str, dict]:
    """Percent kNN and linear accuracy on each probe set; ``features_of(domain)`` -> (N, D)."""
    out = {}
    for d in domains:
        s = score_probes(features_of(d), d.probe_labels, linear=linear)
        out[d.name] = {"knn": round(100 * s.knn, 2),
                       "linear": None if s.linear is None else round(100 * s.linear, 2)}
    return out


def encoder_scores(learner: Learner, domains: list[Domain], linear: bool = True) -> dict[str, dict]:
    return scores(lambda d: embed(learner.backbone, d.probe, learner.eval_transform, device=learner.device),
                  domains, linear)


def stream(domains: list[Domain], batch_size: int, seed: int):
    """Batches of the union of the domains' training images, reshuffled every pass."""
    pool = torch.cat([d.train for d in domains])
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(pool), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield pool[order[start:start + batch_size]]


def margins(a: dict, b: dict) -> dict:
    """a - b per domain and read-out (percentage points)."""
    return {name: {k: None if a[name][k] is None or b[name][k] is None else round(a[name][k] - b[name][k], 2)
                   for k in ("knn", "linear")} for name in a}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    preset = recipe_preset(args)
    settings = Settings(preset=args.preset, method=args.method, device=args.device, seed=args.seed,
                        batch_size=preset.batch_size, lr=preset.lr)
    learner = build_learner(settings, preset=preset)
    domains = [load_domain(name, preset.resolution, args.probe_images) for name in DOMAINS]
    for d in domains:
        log(f"{d.name}: {len(d.train)} train, {len(d.probe)} probe images, {len(set(d.probe_labels))} classes")
    key = json.dumps([args.seed, args.probe_images, preset.resolution, preset.backbone, preset.backbone_kwargs,
                      [(d.name, len(d.train), len(d.probe)) for d in domains]])
    cached = {}
    if args.floors_cache and os.path.isfile(args.floors_cache):
        with open(args.floors_cache) as f:
            cached = json.load(f)
    if cached.get("key") == key:
        pixels, untrained = cached["pixels"], cached["untrained"]
        log(f"floors from {args.floors_cache}")
    else:
        pixels = scores(lambda d: pixel_features(d.probe), domains)
        untrained = encoder_scores(learner, domains)
        if args.floors_cache:
            with open(args.floors_cache, "w") as f:
                json.dump({"key": key, "pixels": pixels, "untrained": untrained}, f)
    log(f"pixels {pixels}")
    log(f"untrained {untrained}")

    batches = stream(domains, preset.batch_size, args.seed)
    images = steps = skipped = 0
    seconds = 0.0
    losses: list[float] = []
    curve = []
    next_eval = args.eval_every
    while images < args.images:
        result = learner.step(next(batches))
        images += result.images
        seconds += result.seconds
        steps += 1
        skipped += result.skipped
        losses.append(result.loss)
        if images >= next_eval or images >= args.images:
            last = images >= args.images
            point = {"images": images, "steps": steps, "seconds": round(seconds, 1),
                     "lr": learner.optimizer.param_groups[0]["lr"],
                     "loss": round(sum(losses) / len(losses), 4),
                     **encoder_scores(learner, domains, linear=last or not args.no_linear)}
            curve.append(point)
            losses = []
            next_eval += args.eval_every
            log(f"{images} images, {seconds:.0f} s: {point}")
    trained = {d.name: curve[-1][d.name] for d in domains}
    return {
        "config": {
            **{k: v for k, v in vars(args).items()},
            "preset_resolved": {**asdict(preset), "description": None},
            "actual_lr": preset.lr * preset.batch_size / 256 if preset.optimizer == "sgd" else preset.lr,
            "train_images": {d.name: len(d.train) for d in domains},
            "probe_images_per_domain": {d.name: len(d.probe) for d in domains},
            "protocol": "leave-one-out weighted kNN (k<=20, T=0.07) + 5-fold linear probe, learners/protocol.py",
            "units": "percent",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "skipped_steps": skipped,
            "train_seconds": round(seconds, 1),
            "images_per_second": round(images / seconds, 1) if seconds else None,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "date": time.strftime("%Y-%m-%d"),
        },
        "pixels": pixels,
        "untrained": untrained,
        "trained": trained,
        "curve": curve,
        "beats": {"untrained": margins(trained, untrained), "pixels": margins(trained, pixels)},
    }


def main() -> None:
    print(json.dumps(run(parse_args())))


if __name__ == "__main__":
    main()
