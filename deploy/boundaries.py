"""Where an experience ends: the domain header, the image count, or a detected drift.

`TAILORD_BOUNDARY` names the signals (docs/operations.md, "Experience boundaries");
`TAILORD_EXPERIENCE_IMAGES` is always the upper bound. The drift detector
(`learners.drift.DriftDetector`) runs on rank 0: after each step it embeds a share of the
step's stream images (`TAILORD_DRIFT_SAMPLE`, evenly spaced), shrunk to `TAILORD_DRIFT_RESOLUTION`
(a quarter of the preset's side by default: the test's power comes from the number of
embeddings, and small ones cost little), with the current encoder in eval mode; when it
finds a shift, the z-score rides rank 0's next `Tick`, so every rank ends the experience at
the same iteration, before that iteration's batch (which belongs to the new experience).
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog
import torch
import torchvision.transforms.v2.functional as TF
from safetensors.torch import load_file, save_file

from deploy.learner import Learner
from deploy.metrics import Metrics
from deploy.progress import Progress
from deploy.settings import Settings
from deploy.world import Agreement
from learners.augment import EvalTransform
from learners.drift import DriftDetector
from learners.evaluation import embed

log = structlog.get_logger()

DRIFT_FILE = "drift.safetensors"  # the detector's state inside a checkpoint
NO_HEADER = "default"  # Sample.domain of a record without a domain header
REFERENCE_WINDOWS = 2  # the drift reference holds this many windows of embeddings
CHECKS_PER_WINDOW = 8  # drift tests per window's worth of new embeddings (every 4: 32 stream images at the defaults)


class Boundaries:
    """The boundary decision of the daemon loop, one place for all three signals."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.modes = settings.boundaries
        self.limit = settings.experience_images
        self.sample = settings.drift_sample
        self.resolution = settings.drift_resolution  # None: a quarter of the preset's side
        self.view: EvalTransform | None = None  # the detector's eval transform, made for the first learner seen
        self.metrics = metrics
        self.detector = DriftDetector(
            window=settings.drift_window, reference=REFERENCE_WINDOWS * settings.drift_window,
            threshold=settings.drift_threshold, patience=settings.drift_patience,
            min_images=settings.drift_min_images, cooldown_images=settings.drift_cooldown_images,
            check_every=settings.drift_window // CHECKS_PER_WINDOW, seed=settings.seed) if "drift" in self.modes else None
        self.pending: float | None = None  # z-score of a drift boundary this rank found, for its next tick
        self.seconds = 0.0  # spent embedding samples and testing (the detector's cost), this process

    def before_step(self, agreed: Agreement, progress: Progress) -> tuple[str, float | None, str | None] | None:
        """(reason, statistic, next domain) when the experience ends before this iteration's batch."""
        if progress.images_in_experience == 0:
            return None
        if agreed.boundary_to is not None and "header" in self.modes:
            return "header", None, agreed.boundary_to
        if agreed.drift is not None:
            return "drift", agreed.drift, self.carried(progress)
        return None

    def after_step(self, progress: Progress) -> tuple[str, None, str | None] | None:
        """("count", None, next domain) when the experience reached TAILORD_EXPERIENCE_IMAGES."""
        return ("count", None, self.carried(progress)) if progress.images_in_experience >= self.limit else None

    def carried(self, progress: Progress) -> str | None:
        """The domain the next experience starts with: with headers on, the next batch's."""
        return None if "header" in self.modes else progress.domain

    def observe(self, learner: Learner, images: torch.Tensor, stream_images: int) -> None:
        """Feed the detector a TAILORD_DRIFT_SAMPLE share of this step's stream images (B,3,S,S) uint8."""
        if self.detector is None or self.pending is not None or not len(images):
            return
        view = self.detector_view(learner)
        def encode(sample: torch.Tensor) -> torch.Tensor:  # (k,3,s,s) uint8 -> (k,D) unit norm
            return embed(learner.backbone, sample, view, device=learner.device)

        started = time.perf_counter()
        pick = torch.linspace(0, len(images) - 1, max(1, round(self.sample * len(images)))).long()
        sample = TF.resize(images[pick], [view.resolution] * 2, antialias=True).cpu()  # (k,3,s,s) uint8, kept
        checks = self.detector.checks
        self.pending = self.detector.update(encode(sample), stream_images, inputs=sample, embed=encode)
        if self.detector.checks != checks:
            self.metrics.drift_statistic.set(self.detector.statistic)
            log.debug("drift_check", statistic=round(self.detector.statistic, 3), streak=self.detector.streak,
                      images_in_experience=self.detector.images_in_experience)
        self.seconds += time.perf_counter() - started

    def detector_view(self, learner: Learner) -> EvalTransform:
        """The learner's evaluation view (its normalization) at the detector's side in px, made on the
        first step (after any resume), when the kept images are brought to that side too."""
        if self.view is None:
            side = self.resolution or max(8, learner.preset.resolution // 4)
            mean, std = learner.eval_transform.mean.flatten().tolist(), learner.eval_transform.std.flatten().tolist()
            self.view = EvalTransform(side, mean, std).to(learner.device)
            self.keep_side(side)
        return self.view

    def keep_side(self, side: int) -> None:
        """Bring the kept images to `side` px when a checkpoint kept them at another (written before
        TAILORD_DRIFT_RESOLUTION existed, or with another value): new samples join them by rows."""
        for key in ("recent_inputs", "past_inputs"):
            kept = getattr(self.detector, key)
            if kept is not None and kept.shape[-1] != side:
                setattr(self.detector, key, TF.resize(kept, [side, side], antialias=True))

    def ended(self, reason: str, statistic: float | None, progress: Progress) -> int:
        """An experience ended for `reason`: count it, log it, and tell the detector. Returns how many
        of its last trained images came after a drift's change point (they belong to the next one)."""
        handed_on = self.detector.boundary(reason) if self.detector is not None else 0
        self.metrics.experience_boundaries.labels(reason).inc()
        log.info("experience_boundary", reason=reason, experience=progress.experience,
                 images_in_experience=progress.images_in_experience, drift_statistic=statistic,
                 drift_threshold=self.detector.threshold if self.detector else None, images_after_change=handed_on)
        self.pending = None  # a new experience starts: a shift found in the old one is moot
        return handed_on

    def save(self, path: Path) -> None:
        """Write the detector's state (a checkpoint writer for `DRIFT_FILE`)."""
        if self.detector is not None:
            save_file(self.detector.state_dict(), str(path))

    def load(self, checkpoint_dir: Path) -> None:
        """Resume the detector from a checkpoint that has its state (older ones start it fresh)."""
        path = checkpoint_dir / DRIFT_FILE
        if self.detector is not None and path.is_file():
            self.detector.load_state_dict(load_file(str(path)))
            self.metrics.drift_statistic.set(self.detector.statistic)


def experience_name(progress: Progress) -> str:
    """The automatic name of the experience in progress: `exp-7`."""
    return f"exp-{progress.experience}"


def experience_record(progress: Progress, reason: str, statistic: float | None) -> dict:
    """What the history, the catalog and manifests keep about a finished experience: its name,
    what ended it, its first and last stream offsets per partition and its time span."""
    offsets = {str(p): [progress.first_offsets.get(p, 0), o - 1] for p, o in sorted(progress.positions.items())
               if o > progress.first_offsets.get(p, 0)}
    return {"name": experience_name(progress), "boundary": reason, "drift_statistic": statistic,
            "offsets": offsets, "started_at": progress.started_at}


def label(progress: Progress) -> str:
    """The experience's domain header, or its automatic name when the stream carries none."""
    return progress.domain if progress.domain not in (None, NO_HEADER) else experience_name(progress)
