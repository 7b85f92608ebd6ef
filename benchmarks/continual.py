"""Continual SSL on a multi-domain stream of real images: ACC, forgetting and BWT per strategy,
next to the raw-pixel and untrained-encoder floors, with kNN and linear probes.

Two settings (``--setting``):

- ``standard`` (default): the built-in domains digits -> fashion -> textures -> photos,
  ``STEPS_PER_EXPERIENCE`` train steps each;
- ``forgetting``: a long first experience on the large ``fashion-train`` (60,000
  Fashion-MNIST training images) followed by an equally long one on the very different
  ``textures``: where ``naive`` should forget fashion, so replay and the regularizers can
  be compared where it matters.

Each domain is decoded once into memory at the preset's resolution with the daemon's own
decoder. Per domain a fixed, class-stratified probe set (at least ``--probe-images``) is
held out; the rest is the training stream. Every trained arm gets the same compute: the
same steps per experience and the same batch size, so the same number of images through
the train step. The learner is the daemon's (``deploy.learner.build_learner``: preset,
method, regularizer, optimizer and lr schedule as ``TAILORD_*`` would build them).

Arms:

- ``pixels``: raw pixels (``learners.protocol.pixel_features``), no encoder (a floor);
- ``untrained``: the encoder at its initialization (a floor; every trained arm with the
  same seed starts from exactly these weights);
- ``random_bn``: ``untrained`` after re-estimating its BatchNorm statistics on the stream
  (forward passes in train mode, no gradient);
- ``naive``, ``replay``, ``ewc``, ``mas``, ``si``, ``l2``, ``distill``, ``replay+distill``
  (any strategy of ``learners.regularizers.STRATEGIES``): one experience per domain, in
  order; replay arms draw ``replay_share`` of each batch from a reservoir buffer (the
  rest from the stream, so every step has ``batch_size`` images);
- ``joint``: the images ``naive`` trains on, shuffled i.i.d. across domains, same steps
  (the upper reference).

Protocol (``learners.protocol.score_probes``): leave-one-out weighted kNN (T = 0.07,
k <= smallest class count - 1 and <= 20) and a linear probe (logistic regression on
standardised frozen features, stratified 5-fold cross-validation); classes with fewer
than 5 probes are not scored. After each experience every probe set seen so far is
scored with both: the accuracy matrices R (kNN) and R_linear (percent), and from each
ACC, BWT and average forgetting (``learners.forgetting``). Floors and ``joint`` are
scored once, at the end. The learning curve (``curve``): every ``--curve-every`` steps
and at every experience end, kNN accuracy on every domain's probe set (the linear probe
only at experience ends, on the domains seen), against images through the train step.

Progress and a markdown table go to stderr; the last line of stdout is one JSON object::

    {"strategies": {NAME: {"acc", "acc_std", "acc_linear", "acc_linear_std",
                           "avg_forgetting", "avg_forgetting_linear", "bwt", "bwt_linear", ...,
                           "per_domain": {DOMAIN: {"knn", "linear", ...}},
                           "minus_untrained", "minus_pixels", "R", "R_linear", "curve"}},
     "floors": {...}, "targets": {...}, "config": {..., "protocol": {...}}}

with means (and sample standard deviations) over seeds.

Budget (default ``standard``: 9 trained arms x 3 seeds x 4 x 80 steps x 64 images = 553k
images through the step): ~37 min of train steps at the ~250 img/s the ``cpu`` preset
does on 2 idle cores, plus ~10 min of evaluation (curve points, linear probes, the pixel
probes), distillation forwards and loading: ~50 min. On a shared machine it is slower.
``forgetting`` (6 trained arms x 3 seeds x 2 x 256 steps x 64 = 590k images): ~45 min.

Run: ``python benchmarks/continual.py`` (defaults above); ``--quick`` (tiny, for CI, well
under a minute); ``--arms pixels,untrained,naive,replay,joint --seeds 1 --scale 0.5``
for a look; ``--setting forgetting``; ``--scale 4 --device cuda`` for longer training.
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
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from deploy.daemon import RECENT_BATCHES
from deploy.learner import Learner, build_learner, paired_views, paired_views_loss
from deploy.settings import Settings
from learners.evaluation import embed
from learners.forgetting import average_accuracy, average_forgetting, backward_transfer
from learners.presets import PRESETS
from learners.protocol import (
    KNN_K,
    KNN_TEMPERATURE,
    LINEAR_FOLDS,
    MIN_CLASS_IMAGES,
    ProbeScore,
    pixel_features,
    score_probes,
)
from learners.regularizers import DEFAULT_LAMBDA, STRATEGIES
from replay.buffer import ReservoirBuffer
from streamer.decode import decode_image
from streamer.limits import DecodeLimits
from streamer.sources.builtin import builtin

DOMAINS = ("digits", "fashion", "textures", "photos")
FLOORS = ("pixels", "untrained", "random_bn")  # arms without training
METHODS = ("simclr", "simsiam", "byol", "moco")
DEFAULT_METHOD: str = Settings.model_fields["method"].default  # the daemon's TAILORD_METHOD default
DEFAULT_STRATEGY: str = Settings.model_fields["strategy"].default  # the daemon's TAILORD_STRATEGY default
STEPS_PER_EXPERIENCE = 80  # standard, scale 1: 9 trained arms x 3 seeds x 4 x 80 x 64 images ~ 37 min at 250 img/s
PROBE_SEED = 0  # probe sets are the same for every seed and arm


@dataclass(frozen=True)
class Setting:
    """A stream: domains in order, train steps per experience (at scale 1), default arms."""

    domains: tuple[str, ...]
    steps: tuple[int, ...]
    arms: tuple[str, ...]
    curve_every: int  # steps between learning-curve points (at scale 1)


SETTINGS = {
    "standard": Setting(
        DOMAINS, (STEPS_PER_EXPERIENCE,) * 4,
        ("pixels", "untrained", "random_bn", "naive", "replay", "ewc", "mas", "si", "l2", "distill",
         "replay+distill", "joint"),
        curve_every=40),
    "forgetting": Setting(
        ("fashion-train", "textures"), (256, 256),
        ("pixels", "untrained", "naive", "replay", "ewc", "distill", "replay+distill", "joint"),
        curve_every=64),
}


@dataclass(frozen=True)
class Config:
    """What one benchmark run trains and evaluates (recorded in the output JSON)."""

    setting: str = "standard"
    domains: tuple[str, ...] = DOMAINS
    arms: tuple[str, ...] = SETTINGS["standard"].arms
    seeds: tuple[int, ...] = (0, 1, 2)
    scale: float = 1.0
    steps_per_experience: tuple[int, ...] = SETTINGS["standard"].steps
    curve_every: int = SETTINGS["standard"].curve_every  # at scale 1; 0: experience ends only
    probe_images: int = 400
    domain_limit: int | None = None  # read at most this many items of each builtin (--quick)
    preset: str = "cpu"
    method: str = DEFAULT_METHOD
    default_strategy: str = DEFAULT_STRATEGY  # the arm the first target is about
    batch_size: int = PRESETS["cpu"].batch_size
    replay_share: float = 0.5  # the daemon's default TAILORD_REPLAY_SHARE
    replay_max_images: int = 2000  # the daemon's default TAILORD_REPLAY_MAX_IMAGES
    device: str = "cpu"
    threads: int | None = None
    regularizer_lambda: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LAMBDA))

    @property
    def steps(self) -> tuple[int, ...]:
        """Train steps of each experience after scaling."""
        return tuple(max(1, round(s * self.scale)) for s in self.steps_per_experience)

    @property
    def curve_steps(self) -> int:
        """Steps between learning-curve points after scaling (0: none between experience ends)."""
        return max(1, round(self.curve_every * self.scale)) if self.curve_every > 0 else 0

    @property
    def images_per_arm(self) -> int:
        return sum(self.steps) * self.batch_size


@dataclass
class Domain:
    """One domain of the stream: training images and the held-out labelled probe set."""

    name: str
    train: torch.Tensor  # (N, 3, S, S) uint8
    probe: torch.Tensor  # (P, 3, S, S) uint8
    probe_labels: list[str]


@dataclass
class Run:
    """One arm with one seed: accuracy rows (R / R_linear for continual arms, one row
    otherwise; percent) and the learning curve."""

    rows: list[list[float | None]]
    linear_rows: list[list[float | None]]
    curve: list[dict] = field(default_factory=list)
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
        images.append(decode_image(item.encoded, limits, resolution))
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


def arrival_orders(domains: list[Domain], counts: list[int], seed: int) -> list[torch.Tensor]:
    """Per domain, the order in which its training images arrive: ``counts[i]`` indices,
    reshuffled each pass (small domains repeat, large ones are only partly seen)."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for domain, count in zip(domains, counts, strict=True):
        n = len(domain.train)
        passes = [torch.randperm(n, generator=generator) for _ in range(-(-count // n))]
        orders.append(torch.cat(passes)[:count])
    return orders


def stream_counts(config: Config) -> list[int]:
    """Stream images per experience (what ``naive`` trains on)."""
    return [s * config.batch_size for s in config.steps]


def joint_batches(domains: list[Domain], orders: list[torch.Tensor], batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The images of ``orders`` (what ``naive`` trains on), shuffled across domains, in batches."""
    offsets = torch.tensor([0, *(len(d.train) for d in domains)]).cumsum(0)
    pool = torch.cat([order + offsets[i] for i, order in enumerate(orders)])
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    train = torch.cat([d.train for d in domains])
    for start in range(0, len(pool), batch_size):
        yield train[pool[start : start + batch_size]]


# ----------------------------------------------------------------------------- the learner


def make_learner(strategy: str, config: Config, seed: int) -> Learner:
    """The daemon's learner (``deploy.learner.build_learner``) for a strategy, seeded.

    The backbone is built first after seeding, so every arm with the same seed starts from
    the same weights (``untrained`` is exactly their common initialization). Every setting
    that shapes the learner is passed explicitly, so no ``TAILORD_*`` variable leaks in.
    """
    settings = Settings(
        _env_file=None, preset=config.preset, method=config.method, strategy=strategy, seed=seed,
        device=config.device, batch_size=config.batch_size, resolution=None, lr=None,
        regularizer_lambda=None, torch_threads=None, compile=False,
    )
    return build_learner(settings)


def score_domains(learner: Learner, domains: list[Domain], linear_for: int = 0) -> list[ProbeScore]:
    """``score_probes`` of each domain's probe set under ``learner``'s backbone; the linear
    probe only for the first ``linear_for`` domains (kNN for all)."""
    return [
        score_probes(embed(learner.backbone, d.probe, learner.eval_transform, device=learner.device),
                     d.probe_labels, linear=i < linear_for)
        for i, d in enumerate(domains)
    ]


def percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def mean_of(values: list[float | None]) -> float | None:
    """Mean of the entries that are not None (None if none is)."""
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def curve_point(step: int, images: int, seen: int, scores: list[ProbeScore], linear: bool) -> dict:
    """A learning-curve point: kNN on every domain (percent), means over the ``seen`` domains
    and over all; with ``linear`` the linear probe's mean over the seen domains."""
    knn = [percent(s.knn) for s in scores]
    point = {"step": step, "images": images, "seen": seen, "knn": knn,
             "knn_seen": mean_of(knn[:seen]), "knn_all": mean_of(knn)}
    if linear:
        point["linear_seen"] = mean_of([percent(s.linear) for s in scores[:seen]])
    return point


# ----------------------------------------------------------------------------- the arms


def run_trained(arm: str, domains: list[Domain], config: Config, seed: int) -> Run:
    """Train a continual arm (one experience per domain, in order) or ``joint``.

    Continual arms: after each experience every probe set seen so far is scored (kNN and
    linear: a row of R and R_linear); ``joint`` is scored once, at the end, on all domains.
    Both add a kNN learning-curve point at step 0, every ``config.curve_steps`` steps and
    at every experience end (``joint``: at the end).

    As the daemon: replay images join the stream images in one step, the buffer is fed
    after the step, and a regularizer's experience end sees two views of the last
    ``RECENT_BATCHES`` stream batches. Unlike the daemon, while the buffer holds fewer
    images than its share the stream fills the batch, so every step has ``batch_size``.
    """
    joint = arm == "joint"
    learner = make_learner("naive" if joint else arm, config, seed)
    buffer = ReservoirBuffer(config.replay_max_images, 2**40, seed=seed) if learner.use_replay else None
    orders = arrival_orders(domains, stream_counts(config), seed)
    run = Run(rows=[], linear_rows=[])
    run.curve.append(curve_point(0, 0, 0, score_domains(learner, domains), linear=False))
    step = 0

    def train(images: torch.Tensor, replay: torch.Tensor | None = None) -> None:
        nonlocal step
        result = learner.step(images, replay)
        run.images += result.images
        run.seconds += result.seconds
        step += 1

    def between(seen: int) -> None:
        """A curve point if one is due (not at an experience end: those score anyway)."""
        if config.curve_steps and step % config.curve_steps == 0:
            run.curve.append(curve_point(step, run.images, seen, score_domains(learner, domains), linear=False))

    if joint:
        batches = list(joint_batches(domains, orders, config.batch_size, seed))
        for i, images in enumerate(batches):
            train(images)
            if i < len(batches) - 1:
                between(len(domains))
        scores = score_domains(learner, domains, linear_for=len(domains))
        run.rows.append([percent(s.knn) for s in scores])
        run.linear_rows.append([percent(s.linear) for s in scores])
        run.curve.append(curve_point(step, run.images, len(domains), scores, linear=True))
        return run

    for e, (domain, order, steps) in enumerate(zip(domains, orders, config.steps, strict=True)):
        recent: deque[torch.Tensor] = deque(maxlen=RECENT_BATCHES)
        cursor = 0
        for i in range(steps):
            n_replay = min(round(config.batch_size * config.replay_share), len(buffer)) if buffer is not None else 0
            index = order[cursor : cursor + config.batch_size - n_replay]
            cursor += len(index)
            images = domain.train[index]
            train(images, buffer.sample(n_replay) if buffer is not None and n_replay else None)
            if buffer is not None:
                buffer.add([f"{domain.name}-{j}" for j in index.tolist()], images, [domain.name] * len(index))
            recent.append(images)
            if i < steps - 1:
                between(e + 1)
        if learner.regularizer is not None:
            learner.regularizer.on_experience_end(learner.backbone, paired_views_loss(learner),
                                                  paired_views(learner, recent))
        scores = score_domains(learner, domains, linear_for=e + 1)
        run.rows.append([percent(s.knn) for s in scores[: e + 1]])
        run.linear_rows.append([percent(s.linear) for s in scores[: e + 1]])
        run.curve.append(curve_point(step, run.images, e + 1, scores, linear=True))
        log(f"  {arm} seed {seed} experience {e} ({domain.name}): kNN {_fmt(run.rows[-1])}, "
            f"linear {_fmt(run.linear_rows[-1])}, {run.images / run.seconds:.0f} img/s")
    return run


def _fmt(values: list[float | None]) -> list[float | None]:
    return [None if v is None else round(v, 1) for v in values]


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


def pixel_scores(domains: list[Domain]) -> list[ProbeScore]:
    """The raw-pixel floor on every probe set (the same for every seed)."""
    return [score_probes(pixel_features(d.probe), d.probe_labels) for d in domains]


def run_floor(arm: str, domains: list[Domain], config: Config, seed: int,
              pixels: list[ProbeScore] | None = None) -> Run:
    """``pixels``: raw pixels; ``untrained``: the initial encoder; ``random_bn``: its
    BatchNorm statistics re-estimated on the joint stream (the images every trained arm sees)."""
    if arm == "pixels":
        scores = pixels if pixels is not None else pixel_scores(domains)
    else:
        learner = make_learner("naive", config, seed)
        if arm == "random_bn":
            orders = arrival_orders(domains, stream_counts(config), seed)
            recalibrate_batchnorm(learner.backbone, learner.eval_transform,
                                  joint_batches(domains, orders, config.batch_size, seed))
        scores = score_domains(learner, domains, linear_for=len(domains))
    return Run(rows=[[percent(s.knn) for s in scores]], linear_rows=[[percent(s.linear) for s in scores]])


def run_arm(arm: str, domains: list[Domain], config: Config, seed: int,
            pixels: list[ProbeScore] | None = None) -> Run:
    if arm in FLOORS:
        return run_floor(arm, domains, config, seed, pixels)
    return run_trained(arm, domains, config, seed)


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


def _mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    return [[rounded(mean(list(cells))) for cells in zip(*rows, strict=True)]
            for rows in zip(*matrices, strict=True)]


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Point-wise mean over seeds (every seed has its points at the same steps)."""
    out = []
    for points in zip(*curves, strict=True):
        first = points[0]
        point = {"step": first["step"], "images": first["images"], "seen": first["seen"],
                 "knn": [rounded(mean(list(c))) for c in zip(*(p["knn"] for p in points), strict=True)]}
        for key in ("knn_seen", "knn_all", "linear_seen"):
            if key in first:
                point[key] = rounded(mean([p[key] for p in points]))
        out.append(point)
    return out


def summarize(runs: list[Run], domains: list[Domain]) -> dict:
    """Means over seeds (and sample stds) of ACC, forgetting and BWT for kNN and linear,
    the final per-domain accuracies, the mean R matrices and the mean learning curve."""
    continual = len(runs[0].rows) > 1
    out: dict = {}
    for suffix, matrices in (("", [r.rows for r in runs]), ("_linear", [r.linear_rows for r in runs])):
        accs = [average_accuracy(m) if continual else mean_of(m[-1]) for m in matrices]
        forgetting = [average_forgetting(m) if continual else None for m in matrices]
        bwt = [backward_transfer(m) if continual else None for m in matrices]
        out |= {f"acc{suffix}": rounded(mean(accs)), f"acc{suffix}_std": rounded(std(accs)),
                f"avg_forgetting{suffix}": rounded(mean(forgetting)),
                f"avg_forgetting{suffix}_std": rounded(std(forgetting)),
                f"bwt{suffix}": rounded(mean(bwt)), f"acc{suffix}_per_seed": [rounded(a) for a in accs]}
    final = {key: [r.rows[-1] if key == "knn" else r.linear_rows[-1] for r in runs] for key in ("knn", "linear")}
    out["per_domain"] = {
        d.name: {key: rounded(mean([row[j] for row in rows])) for key, rows in final.items()}
        | {f"{key}_std": rounded(std([row[j] for row in rows])) for key, rows in final.items()}
        for j, d in enumerate(domains)
    }
    rates = [r.images / r.seconds if r.seconds else None for r in runs]
    out["images"] = runs[0].images
    out["images_per_second"] = rounded(mean(rates))
    out["R"] = _mean_matrix([r.rows for r in runs])
    out["R_linear"] = _mean_matrix([r.linear_rows for r in runs])
    if runs[0].curve:
        out["curve"] = _mean_curve([r.curve for r in runs])
    return out


def add_floor_gaps(strategies: dict[str, dict]) -> None:
    """Beside every arm's numbers, its gap to each floor (``pixels``, ``untrained``) that ran:
    ``minus_<floor>`` = {acc, acc_linear, per_domain: {domain: {knn, linear}}}."""
    for floor in ("pixels", "untrained"):
        if floor not in strategies:
            continue
        f = strategies[floor]
        for name, s in strategies.items():
            if name == floor:
                continue
            s[f"minus_{floor}"] = {
                "acc": _diff(s["acc"], f["acc"]), "acc_linear": _diff(s["acc_linear"], f["acc_linear"]),
                "per_domain": {d: {k: _diff(v[k], f["per_domain"][d][k]) for k in ("knn", "linear")}
                               for d, v in s["per_domain"].items()},
            }


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


# ----------------------------------------------------------------------------- targets


def _std_of(s: dict, key: str) -> float:
    return s.get(f"{key}_std") or 0.0


def at_least(a: float, b: float, margin: float, noise: float) -> dict:
    """Target ``a >= b + margin`` on means over seeds, where a gap counts only when larger
    than the seed std (``noise``).

    margin > 0 (a claimed improvement): ``a - b >= margin`` and ``a - b > noise``.
    margin <= 0 (a tolerated shortfall, "no worse than"): fails only on a shortfall
    (``b + margin - a > 0``) that is also larger than the noise.
    """
    gap = a - b
    if margin > 0:
        passed = gap >= margin and gap > noise
    else:
        shortfall = margin - gap
        passed = shortfall <= 0 or shortfall <= noise
    return {"gap": round(gap, 2), "need": margin, "std": round(noise, 2), "passed": bool(passed)}


def check_targets(strategies: dict[str, dict], default_arm: str = DEFAULT_STRATEGY) -> dict:
    """Issue #13's targets on the arms that ran (means over seeds, kNN and linear).

    - the default method+strategy (``default_arm``) ends >= ``untrained`` on every domain,
      and on the mean over domains >= ``untrained`` + 5 and >= ``pixels`` + 5;
    - ``joint`` >= ``untrained`` + 5;
    - the best continual arm (highest kNN ACC, ``naive`` included) within 1 point of
      ``joint`` or above;
    - ``naive``'s average forgetting (kNN) >= 2 points, and the best strategy's (the
      non-``naive`` continual arm with the highest kNN ACC) <= 50 % of ``naive``'s.

    The noise of a comparison is the larger seed std of the two sides (0 with one seed);
    see ``at_least``. ``all_passed`` is over the targets that could be checked.
    """
    out: dict = {}
    checks: dict[str, dict] = {}
    continual = {n: s for n, s in strategies.items() if n not in (*FLOORS, "joint") and s.get("bwt") is not None}
    if default_arm in strategies:
        out["default_arm"] = default_arm
        checks.update(_default_arm_checks(strategies, default_arm))
    if "joint" in strategies and "untrained" in strategies:
        for probe, key in TARGET_METRICS:
            checks[f"joint_ge_untrained_plus_5_{probe}"] = _compare(strategies["joint"], strategies["untrained"], key, 5)
    if continual:
        best = max(continual, key=lambda n: continual[n]["acc"])
        out["best_continual"] = best
        if "joint" in strategies:
            for probe, key in TARGET_METRICS:
                checks[f"best_within_1_of_joint_{probe}"] = _compare(continual[best], strategies["joint"], key, -1)
    if "naive" in strategies:
        out.update(_forgetting_checks(strategies["naive"], continual, checks))
    out["checks"] = checks
    out["all_passed"] = bool(checks) and all(c["passed"] for c in checks.values())
    return out


TARGET_METRICS = (("knn", "acc"), ("linear", "acc_linear"))  # (probe, summary key) of each target


def _compare(a: dict, b: dict, key: str, margin: float) -> dict:
    """`at_least` on `key` with the larger seed std of the two sides as the noise."""
    return at_least(a[key], b[key], margin, max(_std_of(a, key), _std_of(b, key)))


def _default_arm_checks(strategies: dict[str, dict], default_arm: str) -> dict[str, dict]:
    """The default arm >= untrained on every domain and on the mean + 5, and >= pixels + 5."""
    checks: dict[str, dict] = {}
    d = strategies[default_arm]
    for probe, key in TARGET_METRICS:
        if "untrained" in strategies:
            u = strategies["untrained"]
            per = {
                dom: at_least(v[probe], u["per_domain"][dom][probe], 0,
                              max(v.get(f"{probe}_std") or 0.0, u["per_domain"][dom].get(f"{probe}_std") or 0.0))
                for dom, v in d["per_domain"].items()
            }
            checks[f"default_ge_untrained_every_domain_{probe}"] = {
                "per_domain": per, "passed": all(c["passed"] for c in per.values())}
            checks[f"default_ge_untrained_plus_5_{probe}"] = _compare(d, u, key, 5)
        if "pixels" in strategies:
            checks[f"default_ge_pixels_plus_5_{probe}"] = _compare(d, strategies["pixels"], key, 5)
    return checks


def _forgetting_checks(naive: dict, continual: dict[str, dict], checks: dict[str, dict]) -> dict:
    """Adds naive forgets >= 2 and the best strategy forgets <= half of it to `checks`;
    returns {"best_strategy": name} when there is one."""
    f_naive, s_naive = naive["avg_forgetting"], _std_of(naive, "avg_forgetting")
    others = {n: s for n, s in continual.items() if n != "naive"}
    if f_naive is None:
        return {}
    checks["naive_forgets_2"] = at_least(f_naive, 0, 2, s_naive)
    if not others:
        return {}
    best_strategy = max(others, key=lambda n: others[n]["acc"])
    b = others[best_strategy]
    # forgetting(best) <= forgetting(naive) / 2  <=>  f_naive - f_best >= f_naive / 2
    check = at_least(f_naive, b["avg_forgetting"], f_naive / 2, max(s_naive, _std_of(b, "avg_forgetting")))
    check["passed"] = check["passed"] and checks["naive_forgets_2"]["passed"]
    checks["best_strategy_forgetting_le_half_naive"] = check
    return {"best_strategy": best_strategy}


# ----------------------------------------------------------------------------- output


def markdown_table(result: dict) -> str:
    """The summary as a markdown table: kNN / linear per arm, with each floor's row first."""
    strategies = result["strategies"]
    domains = list(next(iter(strategies.values()))["per_domain"])

    def cell(v: float | None, s: float | None = None) -> str:
        if v is None:
            return "—"
        return f"{v:.1f}" if not s else f"{v:.1f} ± {s:.1f}"

    head = ("| arm | ACC kNN | ACC linear | forgetting kNN | forgetting linear | BWT kNN | img/s | "
            + " | ".join(f"{d} kNN / lin" for d in domains) + " |")
    lines = [head, "|" + "---|" * (7 + len(domains))]
    order = [a for a in FLOORS if a in strategies] + [a for a in strategies if a not in FLOORS]
    for arm in order:
        s = strategies[arm]
        lines.append(
            f"| `{arm}` | {cell(s['acc'], s['acc_std'])} | {cell(s['acc_linear'], s['acc_linear_std'])} | "
            f"{cell(s['avg_forgetting'], s['avg_forgetting_std'])} | "
            f"{cell(s['avg_forgetting_linear'], s['avg_forgetting_linear_std'])} | {cell(s['bwt'])} | "
            f"{cell(s['images_per_second'])} | "
            + " | ".join(f"{cell(s['per_domain'][d]['knn'])} / {cell(s['per_domain'][d]['linear'])}"
                         for d in domains) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="standard",
                        help="standard: digits -> fashion -> textures -> photos; forgetting: "
                             "fashion-train -> textures, long experiences")
    parser.add_argument("--arms", default=None, help="comma list of pixels, untrained, random_bn, joint or any "
                        "strategy of learners.regularizers.STRATEGIES (default: the setting's)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the train steps per experience "
                        f"({STEPS_PER_EXPERIENCE} standard, 256 forgetting) and --curve-every")
    parser.add_argument("--curve-every", type=int, default=None,
                        help="steps between learning-curve points at scale 1 (0: experience ends only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--probe-images", type=int, default=400, help="probe images per domain (>= 300 advised)")
    parser.add_argument("--domains", default=None, help="comma list of builtin domains, in order "
                        "(default: the setting's; each experience gets the setting's first length)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help=f"self-supervised method (default: the daemon's, {DEFAULT_METHOD})")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: 2 small domains, 1 seed, "
                        "2 steps per experience of 16 images, 5 arms, 1 thread (seconds)")
    args = parser.parse_args(argv)
    setting = SETTINGS[args.setting]
    domains = tuple(args.domains.split(",")) if args.domains else setting.domains
    steps = setting.steps if not args.domains else (setting.steps[0],) * len(domains)
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip()) if args.arms else setting.arms
    unknown = [a for a in arms if a not in (*FLOORS, "joint", *STRATEGIES)]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}")
    config = Config(setting=args.setting, domains=domains, arms=arms, seeds=tuple(range(args.seeds)),
                    scale=args.scale, steps_per_experience=steps,
                    curve_every=setting.curve_every if args.curve_every is None else args.curve_every,
                    probe_images=args.probe_images, method=args.method, device=args.device, threads=args.threads)
    if args.quick:
        config = Config(
            setting="quick", domains=("digits", "fashion"),
            arms=arms if args.arms else ("pixels", "untrained", "naive", "replay", "joint"),
            seeds=(0,), scale=1.0, steps_per_experience=(2, 2), curve_every=1, probe_images=50,
            domain_limit=200, method=args.method, batch_size=16, replay_max_images=64,
            device=args.device, threads=args.threads or 1)
    return config


def benchmark(config: Config) -> dict:
    """Load the stream, run every arm for every seed, return the summary (the output JSON)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    resolution = PRESETS[config.preset].resolution
    domains = [load_domain(name, resolution, config.probe_images, config.domain_limit) for name in config.domains]
    for d in domains:
        log(f"{d.name}: {len(d.train)} train, {len(d.probe)} probe images, {len(set(d.probe_labels))} classes")
    pixels = pixel_scores(domains)  # also gives the protocol details per domain (they depend on labels only)
    # the floors are always measured: every trained number is reported beside them
    arms = [a for a in ("pixels", "untrained") if a not in config.arms] + list(config.arms)
    strategies = {}
    for arm in arms:
        runs = []
        for seed in config.seeds:
            arm_start = time.perf_counter()
            runs.append(run_arm(arm, domains, config, seed, pixels))
            log(f"{arm} seed {seed}: final kNN {_fmt(runs[-1].rows[-1])}, linear {_fmt(runs[-1].linear_rows[-1])} "
                f"({time.perf_counter() - arm_start:.0f} s)")
        strategies[arm] = summarize(runs, domains)
        log(f"{arm}: ACC kNN {strategies[arm]['acc']} linear {strategies[arm]['acc_linear']}, "
            f"forgetting kNN {strategies[arm]['avg_forgetting']}")
    add_floor_gaps(strategies)
    learner = make_learner("naive", config, 0)
    preset = learner.preset
    result = {
        "strategies": strategies,
        "floors": {f: {"acc": strategies[f]["acc"], "acc_linear": strategies[f]["acc_linear"],
                       "per_domain": strategies[f]["per_domain"]} for f in ("pixels", "untrained")},
        "targets": check_targets(strategies, config.default_strategy),
        "config": {
            **asdict(config),
            "steps": list(config.steps),
            "curve_steps": config.curve_steps,
            "images_per_arm": config.images_per_arm,
            "train_images": {d.name: len(d.train) for d in domains},
            "probe_images_per_domain": {d.name: len(d.probe) for d in domains},
            "preset": {k: v for k, v in asdict(preset).items() if k != "description"},
            "resolution": resolution,
            "protocol": {
                "knn": {"kind": "leave-one-out weighted kNN", "k_max": KNN_K, "temperature": KNN_TEMPERATURE},
                "linear": {"kind": "logistic regression on standardised frozen features, stratified k-fold CV",
                           "folds_max": LINEAR_FOLDS},
                "min_class_images": MIN_CLASS_IMAGES,
                "per_domain": {d.name: {"k": s.k, "folds": s.folds, "classes": s.classes, "scored": s.scored,
                                        "chance": rounded(percent(s.chance))}
                               for d, s in zip(domains, pixels, strict=True)},
            },
            "units": "percent",
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
    }
    return result


def main() -> None:
    config = parse_args()
    # BLAS (the linear probes) gets as many threads as torch: oversubscribed OpenMP/BLAS
    # threads make a shared 2-core machine ~10x slower
    with threadpool_limits(limits=config.threads):
        result = benchmark(config)
    print(markdown_table(result), file=sys.stderr)
    print(json.dumps(result["targets"], indent=1), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
