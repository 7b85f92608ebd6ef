"""Experience-end evaluation: one row of the accuracy matrices, CKA drift, probe SSL loss, baselines.

Every labelled probe set is scored with the protocol of `learners/protocol.py`
(leave-one-out weighted kNN and a cross-validated linear probe on the probe set itself;
docs/continual.md "Protocol"), so no training image or label is needed. When a probe set
is created it is also scored once with its two floors: raw pixels and the run's untrained
encoder (the step-0 weights kept in `<state>/untrained.safetensors`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from deploy.learner import Learner
from deploy.probes import ProbeSet
from learners.augment import BatchAugment, EvalTransform
from learners.evaluation import embed, linear_cka
from learners.protocol import UNSCORED, ProbeScore, pixel_features, score_probes
from learners.train_step import ssl_loss
from safefiles.files import write_atomic

UNTRAINED_FILE = "untrained.safetensors"  # in the state dir: the encoder before its first step


@dataclass
class EvalRow:
    """Results on probe sets 1..i after experience i, in experience order."""

    accuracy: list[float | None]  # leave-one-out kNN: the accuracy matrix R
    linear: list[float | None]  # cross-validated linear probe
    cka: list[float | None]
    probe_loss: list[float | None]


@dataclass(frozen=True)
class FrozenModel:
    """The learner's model as it was at one moment (an experience end), for scoring off the
    training thread: the loop goes on changing the learner's weights meanwhile."""

    method: nn.Module  # a copy, eval mode, no gradients
    augment: BatchAugment  # shared: constants only (the probe SSL loss draws from a private generator)
    eval_transform: EvalTransform  # shared: constants only
    device: torch.device

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone

    @classmethod
    def of(cls, learner: Learner) -> FrozenModel:
        """A copy of the learner's model now (its weights are copied, not shared)."""
        method = copy.deepcopy(learner.method).eval().requires_grad_(False)
        return cls(method, learner.augment, learner.eval_transform, learner.device)


Model = Learner | FrozenModel  # what the scoring functions read: backbone, method, augment, eval_transform, device


def score(features: torch.Tensor, probes: ProbeSet) -> ProbeScore:
    """The protocol's scores of `features` on a probe set (UNSCORED without labels)."""
    return score_probes(features, probes.labels) if probes.labelled else UNSCORED


def evaluate_row(learner: Model, probe_sets: dict[int, ProbeSet], experience: int,
                 features_dir: Path, pace: Callable[[], None] = lambda: None) -> EvalRow:
    """Evaluate every finished probe set j <= `experience` with the current encoder.

    The features of probe set `experience` are saved as its reference for later CKA.
    `pace` is called before each probe set (the evaluator waits there for its compute budget).
    """
    features_dir.mkdir(parents=True, exist_ok=True)
    row = EvalRow([], [], [], [])
    for j in range(1, experience + 1):
        probes = probe_sets.get(j)
        pace()
        if probes is None or len(probes) < 2:
            for column in (row.accuracy, row.linear, row.cka, row.probe_loss):
                column.append(None)
            continue
        images = probes.stacked()
        feats = embed(learner.backbone, images, learner.eval_transform, device=learner.device).cpu()
        ref_path = features_dir / f"exp-{j:06d}.safetensors"
        if j == experience:
            try:
                save_file({"features": feats.contiguous()}, str(ref_path))
            except Exception:  # disk full: this row still gets accuracy and loss, CKA waits
                ref_path.unlink(missing_ok=True)
        scores = score(feats, probes)
        row.accuracy.append(scores.knn)
        row.linear.append(scores.linear)
        row.cka.append(linear_cka(feats, load_file(str(ref_path))["features"]) if ref_path.is_file() else None)
        row.probe_loss.append(probe_ssl_loss(learner, images))
    return row


def keep_untrained(learner: Learner, state_dir: Path) -> None:
    """On a fresh start, keep the step-0 backbone weights (written once, atomically).

    This is "the encoder before tailord trained it": random init, or the starting weights of
    TAILORD_INIT_WEIGHTS when set, so the untrained floor then measures what tailord added."""
    path = state_dir / UNTRAINED_FILE
    if not path.is_file():
        state = {k: v.detach().cpu().contiguous() for k, v in learner.backbone.state_dict().items()}
        write_atomic(path, save(state))


def untrained_encoder(learner: Model, state_dir: Path) -> nn.Module | None:
    """A copy of the backbone holding the step-0 weights; None if this state dir predates them."""
    path = state_dir / UNTRAINED_FILE
    if not path.is_file():
        return None
    encoder = copy.deepcopy(learner.backbone)
    encoder.load_state_dict(load_file(str(path), device=str(learner.device)))
    return encoder


def score_baselines(learner: Model, probes: ProbeSet, state_dir: Path) -> dict:
    """The floors of a new probe set: raw pixels and the untrained encoder, with k, chance and sizes.

    `{}` for a probe set without labels; "untrained" is null for a state dir without
    step-0 weights (created before they were kept).
    """
    if len(probes) < 2 or not probes.labelled:
        return {}
    images = probes.stacked()
    pixels = score(pixel_features(images), probes)
    encoder = untrained_encoder(learner, state_dir)
    untrained = None
    if encoder is not None:
        untrained = score(embed(encoder, images, learner.eval_transform, device=learner.device), probes).to_json()
    return {"pixels": pixels.to_json(), "untrained": untrained, "k": pixels.k, "chance": pixels.chance,
            "classes": pixels.classes, "scored": pixels.scored, "folds": pixels.folds}


@torch.no_grad()
def probe_ssl_loss(learner: Model, images: torch.Tensor, batch: int = 256, seed: int = 1234) -> float:
    """Mean SSL loss on probe images, the views drawn from a private generator seeded `seed`
    (rows comparable over time). The global RNGs (CPU and every accelerator), which drive the
    training augmentation, are neither read nor reseeded."""
    generator = torch.Generator(device=learner.device).manual_seed(seed)
    was_training = learner.method.training
    learner.method.eval()
    losses = []
    try:
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch].to(learner.device)
            if len(chunk) >= 2:
                losses.append(float(ssl_loss(learner.method, learner.augment, chunk, generator=generator)))
    finally:
        learner.method.train(was_training)
    return sum(losses) / len(losses) if losses else float("nan")
