"""Continual SSL on a multi-domain stream of real images: forgetting, ACC and BWT per strategy.

The stream is the built-in domains (digits -> fashion -> textures -> photos), decoded once
into memory at the preset's resolution with the daemon's own decoder. Per domain a fixed,
class-stratified probe set (at least ``--probe-images``) is held out; the rest is the
training stream. Every arm gets the same compute: the same number of steps per experience,
the same batch size, so the same images through the train step.

Arms:

- ``random``: the untrained encoder (the floor);
- ``random_bn``: the untrained encoder after re-estimating its BatchNorm statistics on the
  stream (forward passes in train mode, no gradient; a stronger floor);
- ``naive``, ``replay``, ``ewc``, ``mas``, ``si``, ``l2``, ``distill``, ``replay+distill``
  (any strategy of ``learners.regularizers.STRATEGIES``): one experience per domain,
  trained in order; replay arms draw ``replay_share`` of each batch from a reservoir
  buffer (the rest from the stream, so every step has ``batch_size`` images);
- ``joint``: the images the ``naive`` arm trains on, shuffled i.i.d. across domains, for
  the same number of steps (the upper reference).

After each experience every probe set seen so far is evaluated with the daemon's
leave-one-out weighted kNN (k<=20, T=0.07; ``learners.protocol``), giving the
accuracy matrix R (in percent) and from it ACC, BWT and average forgetting
(``learners.forgetting``). ``random``, ``random_bn`` and ``joint`` are evaluated once
at the end (ACC = mean over domains; BWT and forgetting are null).

Progress goes to stderr; the last line of stdout is one JSON object::

    {"strategies": {NAME: {"acc", "acc_std", "avg_forgetting", "avg_forgetting_std", "bwt",
                           "images_per_second", "per_domain", "acc_per_seed", "R"}},
     "targets": {...}, "config": {...}}

with means (and sample standard deviations) over seeds.

Run: ``python benchmarks/continual.py`` (default scale: ~25 min on 2 idle CPU cores);
``--arms random,naive,replay,joint --seeds 2 --scale 0.3`` for a quick look;
``--scale 4`` for longer training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice

import torch
from torch import nn

from deploy.daemon import RECENT_BATCHES, paired_views, paired_views_loss
from deploy.learner import Learner
from learners.augment import BatchAugment, EvalTransform
from learners.backbones import build_backbone
from learners.device import default_amp, pick_device, use_channels_last
from learners.evaluation import embed
from learners.forgetting import average_accuracy, average_forgetting, backward_transfer
from learners.methods import build_method
from learners.presets import PRESETS
from learners.protocol import KNN_K, KNN_TEMPERATURE, score_probes
from learners.regularizers import DEFAULT_LAMBDA, STRATEGIES, build_regularizer, parse_strategy
from learners.train_step import TrainStep, build_optimizer
from replay.buffer import ReservoirBuffer
from streamer.decode import decode_record
from streamer.limits import DecodeLimits
from streamer.sources.builtin import builtin

DOMAINS = ("digits", "fashion", "textures", "photos")
FLOORS = ("random", "random_bn")
ARMS = (*FLOORS, "joint", "naive", "replay", "replay+distill", "ewc", "mas", "si", "l2", "distill")
STEPS_PER_EXPERIENCE = 48  # at scale 1: 9 trained arms x 3 seeds x 4 x 48 x 64 images ~ 25 min at ~250 img/s
PROBE_SEED = 0  # probe sets are the same for every seed and arm


@dataclass(frozen=True)
class Config:
    """What one benchmark run trains and evaluates (recorded in the output JSON)."""

    domains: tuple[str, ...] = DOMAINS
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    scale: float = 1.0
    steps_per_experience: int = STEPS_PER_EXPERIENCE
    probe_images: int = 400
    preset: str = "cpu"
    method: str = "simsiam"
    batch_size: int = PRESETS["cpu"].batch_size
    replay_share: float = 0.5  # the daemon's default TAILORD_REPLAY_SHARE
    replay_max_images: int = 2000  # the daemon's default TAILORD_REPLAY_MAX_IMAGES
    device: str = "cpu"
    threads: int | None = None
    regularizer_lambda: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LAMBDA))

    @property
    def steps(self) -> int:
        """Train steps per experience after scaling."""
        return max(1, round(self.steps_per_experience * self.scale))


@dataclass
class Domain:
    """One domain of the stream: training images and the held-out labelled probe set."""

    name: str
    train: torch.Tensor  # (N, 3, S, S) uint8
    probe: torch.Tensor  # (P, 3, S, S) uint8
    probe_labels: list[str]


@dataclass
class Run:
    """One arm with one seed: the accuracy rows (R for continual arms, one row otherwise)."""

    rows: list[list[float]]
    images: int = 0  # images through the train step
    seconds: float = 0.0  # wall time of the train steps


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the stream


def load_domain(name: str, resolution: int, probe_images: int, limit: int | None = None) -> Domain:
    """Decode builtin ``name`` with the daemon's decoder; hold out a class-stratified probe set.

    Each class gives ``ceil(count * probe_images / N)`` images (so the probe set has at
    least ``probe_images``), chosen by a fixed permutation: the same for every run.
    """
    limits = DecodeLimits()
    images, labels = [], []
    for item in islice(builtin(name), limit):
        images.append(decode_record(item.encoded, [], limits, resolution)[0].image)
        labels.append(item.label)
    n = len(images)
    if not probe_images < n:
        raise ValueError(f"{name}: {n} images, cannot hold out {probe_images} probes")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(PROBE_SEED)).tolist()
    share = probe_images / n
    by_class: dict[str, list[int]] = {}
    for i in order:
        by_class.setdefault(labels[i], []).append(i)
    probe = sorted(i for members in by_class.values() for i in members[: math.ceil(len(members) * share)])
    held_out = set(probe)
    train = [i for i in range(n) if i not in held_out]
    stack = torch.stack(images)
    return Domain(name, stack[train], stack[probe], [labels[i] for i in probe])


def arrival_orders(domains: list[Domain], count: int, seed: int) -> list[torch.Tensor]:
    """Per domain, the order in which its training images arrive: ``count`` indices,
    reshuffled each pass (small domains repeat, large ones are only partly seen)."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for domain in domains:
        n = len(domain.train)
        passes = [torch.randperm(n, generator=generator) for _ in range(-(-count // n))]
        orders.append(torch.cat(passes)[:count])
    return orders


def joint_batches(domains: list[Domain], orders: list[torch.Tensor], config: Config, seed: int) -> Iterator[torch.Tensor]:
    """The images of ``orders`` (what ``naive`` trains on), shuffled across domains, in batches."""
    offsets = torch.tensor([0, *(len(d.train) for d in domains)]).cumsum(0)
    pool = torch.cat([order + offsets[i] for i, order in enumerate(orders)])
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    train = torch.cat([d.train for d in domains])
    for start in range(0, len(pool), config.batch_size):
        yield train[pool[start : start + config.batch_size]]


# ----------------------------------------------------------------------------- the learner


def make_learner(strategy: str, config: Config, seed: int) -> Learner:
    """The daemon's learner (as ``deploy.learner.build_learner``) for a strategy, seeded.

    The backbone is built first after seeding, so every arm with the same seed starts from
    the same weights (``random`` is exactly their common initialization).
    """
    torch.manual_seed(seed)
    device = pick_device(config.device)
    preset = replace(PRESETS[config.preset], batch_size=config.batch_size)
    backbone = build_backbone(preset.backbone, preset.backbone_kwargs)
    method = build_method(config.method, backbone).to(device)
    use_replay, reg_name = parse_strategy(strategy) if strategy in STRATEGIES else (False, None)
    regularizer = None
    if reg_name is not None:
        regularizer = build_regularizer(reg_name, config.regularizer_lambda[reg_name],
                                        feature_dim=backbone.feature_dim).to(device)
    extra = regularizer.parameters() if regularizer is not None else []
    optimizer = build_optimizer(method, preset, extra_params=extra)
    augment = BatchAugment(preset.resolution).to(device)
    eval_transform = EvalTransform(preset.resolution).to(device)
    step = TrainStep(method, augment, optimizer, device, amp=default_amp(device),
                     channels_last=use_channels_last(device), regularizer=regularizer)
    return Learner(preset, device, method, augment, eval_transform, regularizer, optimizer, step, use_replay)


def knn_row(learner: Learner, domains: list[Domain]) -> list[float]:
    """Leave-one-out weighted-kNN accuracy (percent, ``learners.protocol``) on each domain's probe set."""
    return [
        100 * score_probes(embed(learner.backbone, d.probe, learner.eval_transform, device=learner.device),
                           d.probe_labels, linear=False).knn
        for d in domains
    ]


# ----------------------------------------------------------------------------- the arms


def run_continual(strategy: str, domains: list[Domain], config: Config, seed: int) -> Run:
    """Train one experience per domain in order; evaluate all probe sets seen after each.

    As the daemon: replay images join the stream images in one step, the buffer is fed
    after the step, and a regularizer's experience end sees two views of the last
    ``RECENT_BATCHES`` stream batches. Unlike the daemon, while the buffer holds fewer
    images than its share the stream fills the batch, so every step has ``batch_size``.
    """
    learner = make_learner(strategy, config, seed)
    buffer = ReservoirBuffer(config.replay_max_images, 2**40, seed=seed) if learner.use_replay else None
    orders = arrival_orders(domains, config.steps * config.batch_size, seed)
    run = Run(rows=[])
    for e, (domain, order) in enumerate(zip(domains, orders, strict=True)):
        recent: deque[torch.Tensor] = deque(maxlen=RECENT_BATCHES)
        cursor = 0
        for _ in range(config.steps):
            n_replay = min(round(config.batch_size * config.replay_share), len(buffer)) if buffer is not None else 0
            index = order[cursor : cursor + config.batch_size - n_replay]
            cursor += len(index)
            images = domain.train[index]
            replay = buffer.sample(n_replay) if buffer is not None and n_replay else None
            result = learner.step(images, replay)
            run.images += result.images
            run.seconds += result.seconds
            if buffer is not None:
                buffer.add([f"{domain.name}-{i}" for i in index.tolist()], images, [domain.name] * len(index))
            recent.append(images)
        if learner.regularizer is not None:
            learner.regularizer.on_experience_end(learner.backbone, paired_views_loss(learner),
                                                  paired_views(learner, recent))
        run.rows.append(knn_row(learner, domains[: e + 1]))
        log(f"  {strategy} seed {seed} experience {e} ({domain.name}): "
            f"kNN {[round(a, 1) for a in run.rows[-1]]}, {run.images / run.seconds:.0f} img/s")
    return run


def run_joint(domains: list[Domain], config: Config, seed: int) -> Run:
    """The naive arm's images, shuffled i.i.d., same steps; evaluated once at the end."""
    learner = make_learner("naive", config, seed)
    orders = arrival_orders(domains, config.steps * config.batch_size, seed)
    run = Run(rows=[])
    for images in joint_batches(domains, orders, config, seed):
        result = learner.step(images)
        run.images += result.images
        run.seconds += result.seconds
    run.rows.append(knn_row(learner, domains))
    return run


def recalibrate_batchnorm(backbone: nn.Module, transform: nn.Module, batches: Iterator[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics by their plain average over ``batches``
    (forward passes in train mode without gradient; the weights do not change)."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    device = next(backbone.parameters()).device
    backbone.train()
    with torch.no_grad():
        for images in batches:
            backbone(transform(images.to(device)))
    for m in norms:
        m.momentum = 0.1


def run_floor(arm: str, domains: list[Domain], config: Config, seed: int) -> Run:
    """``random``: the initial encoder; ``random_bn``: its BatchNorm statistics re-estimated
    on the joint stream (the images every trained arm sees)."""
    learner = make_learner("naive", config, seed)
    if arm == "random_bn":
        orders = arrival_orders(domains, config.steps * config.batch_size, seed)
        recalibrate_batchnorm(learner.backbone, learner.eval_transform,
                              joint_batches(domains, orders, config, seed))
    return Run(rows=[knn_row(learner, domains)])


def run_arm(arm: str, domains: list[Domain], config: Config, seed: int) -> Run:
    if arm in FLOORS:
        return run_floor(arm, domains, config, seed)
    if arm == "joint":
        return run_joint(domains, config, seed)
    return run_continual(arm, domains, config, seed)


# ----------------------------------------------------------------------------- summaries


def mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def std(values: list[float | None]) -> float | None:
    """Sample standard deviation over seeds (0 for one seed, None if any value is None)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summarize(runs: list[Run], domains: list[Domain]) -> dict:
    """Means over seeds of ACC, forgetting, BWT, throughput; final per-domain accuracies."""
    continual = len(runs[0].rows) > 1
    accs = [average_accuracy(r.rows) if continual else statistics.fmean(r.rows[-1]) for r in runs]
    forgetting = [average_forgetting(r.rows) if continual else None for r in runs]
    bwt = [backward_transfer(r.rows) if continual else None for r in runs]
    rates = [r.images / r.seconds if r.seconds else None for r in runs]
    mean_rows = [[statistics.fmean(col) for col in zip(*rows, strict=True)]
                 for rows in zip(*(r.rows for r in runs), strict=True)]
    return {
        "acc": rounded(mean(accs)),
        "acc_std": rounded(std(accs)),
        "avg_forgetting": rounded(mean(forgetting)),
        "avg_forgetting_std": rounded(std(forgetting)),
        "bwt": rounded(mean(bwt)),
        "images_per_second": rounded(mean(rates)),
        "per_domain": {d.name: round(a, 2) for d, a in zip(domains, mean_rows[-1], strict=True)},
        "acc_per_seed": [rounded(a) for a in accs],
        "R": [[round(a, 2) for a in row] for row in mean_rows],
    }


def check_targets(strategies: dict[str, dict]) -> dict:
    """The issue's targets, on whichever of the needed arms ran.

    ``best`` is the anti-forgetting arm (any continual arm but ``naive``) with the highest
    ACC. A gap "exceeds the seed std" when it is larger than the larger standard deviation
    of the two arms compared. Halving forgetting counts only if ``naive`` forgets at all
    (its forgetting exceeds its own seed std).
    """
    out: dict = {}

    def gap(name: str, a: dict, c: dict, key: str = "acc") -> None:
        """``out[name]`` = a - c, and whether that exceeds both arms' seed std."""
        out[name] = rounded(a[key] - c[key])
        out[f"{name}_exceeds_std"] = a[key] - c[key] > max(a[f"{key}_std"], c[f"{key}_std"])

    candidates = {n: s for n, s in strategies.items() if n not in (*FLOORS, "joint", "naive")}
    best = max(candidates, key=lambda n: candidates[n]["acc"]) if candidates else None
    if best is not None:
        out["best_continual"] = best
    for floor in (f for f in FLOORS if f in strategies):
        for name in (n for n in ("joint", best) if n in strategies):
            label = "joint" if name == "joint" else "best"
            gap(f"{label}_minus_{floor}", strategies[name], strategies[floor])
            out[f"{label}_beats_{floor}_by_5"] = strategies[name]["acc"] - strategies[floor]["acc"] >= 5
    if best is not None and "joint" in strategies:
        out["best_within_1_of_joint"] = strategies[best]["acc"] >= strategies["joint"]["acc"] - 1
    if best is not None and "naive" in strategies:
        naive, b = strategies["naive"], strategies[best]
        gap("naive_minus_best_forgetting", naive, b, key="avg_forgetting")
        out["naive_forgets"] = naive["avg_forgetting"] > naive["avg_forgetting_std"]
        out["best_forgetting_at_most_half_of_naive"] = (
            out["naive_forgets"] and b["avg_forgetting"] <= naive["avg_forgetting"] / 2
        )
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)} "
                        "(or any strategy of learners.regularizers.STRATEGIES)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"multiplies the {STEPS_PER_EXPERIENCE} train steps per experience")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--probe-images", type=int, default=400, help="probe images per domain (>= 300 advised)")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma list of builtin domains, in order")
    parser.add_argument("--method", choices=["simsiam", "byol", "simclr"], default="simclr")
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto")
    args = parser.parse_args(argv)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in (*ARMS, *STRATEGIES)]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}")
    return Config(domains=tuple(args.domains.split(",")), arms=arms, seeds=tuple(range(args.seeds)),
                  scale=args.scale, probe_images=args.probe_images, method=args.method,
                  device=args.device, threads=args.threads)


def benchmark(config: Config) -> dict:
    """Load the stream, run every arm for every seed, return the summary (the output JSON)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    resolution = PRESETS[config.preset].resolution
    domains = [load_domain(name, resolution, config.probe_images) for name in config.domains]
    for d in domains:
        log(f"{d.name}: {len(d.train)} train, {len(d.probe)} probe images, {len(set(d.probe_labels))} classes")
    strategies = {}
    for arm in config.arms:
        runs = []
        for seed in config.seeds:
            arm_start = time.perf_counter()
            runs.append(run_arm(arm, domains, config, seed))
            log(f"{arm} seed {seed}: final kNN {[round(a, 1) for a in runs[-1].rows[-1]]} "
                f"({time.perf_counter() - arm_start:.0f} s)")
        strategies[arm] = summarize(runs, domains)
        log(f"{arm}: {json.dumps(strategies[arm])}")
    preset = PRESETS[config.preset]
    return {
        "strategies": strategies,
        "targets": check_targets(strategies),
        "config": {
            **asdict(config),
            "steps": config.steps,
            "images_per_arm": config.steps * config.batch_size * len(domains),
            "train_images": {d.name: len(d.train) for d in domains},
            "probe_images_per_domain": {d.name: len(d.probe) for d in domains},
            "backbone": {"name": preset.backbone, **preset.backbone_kwargs},
            "resolution": resolution,
            "lr": preset.lr,
            "knn": {"k": KNN_K, "temperature": KNN_TEMPERATURE, "protocol": "leave-one-out"},
            "units": "percent",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
    }


def main() -> None:
    print(json.dumps(benchmark(parse_args())))


if __name__ == "__main__":
    main()
