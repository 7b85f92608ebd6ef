"""A distribution-shift detector on embeddings of a live stream (no labels, no header).

The stream's recent samples (a window of ``window`` embeddings) are compared with the
samples just before them in the current experience (a reference of up to ``reference``
embeddings) by a kernel two-sample statistic: the (biased) squared MMD with a sum of
Gaussian kernels whose bandwidths are 1/8 to 2 times the mean pairwise squared distance
(several scales: one wide kernel hardly told two kinds of natural-image crops apart). A permutation null (the same
pooled samples, relabelled ``permutations`` times) turns it into a z-score, which is
the statistic reported: how many null standard deviations the observed MMD lies above
the null mean. A boundary is due when the z-score exceeds ``threshold`` on ``patience``
consecutive checks, the experience holds ``min_images`` and the last drift boundary is
at least ``cooldown_images`` back. The reference slides (first in, first out), so a
slow drift is absorbed into it and never cuts; only a change faster than the window
and reference span is significant. Once ``patience`` checks in a row were above the
threshold the reference stops sliding, so a shift held back by the min length or the
cool-down is still cut once they allow it (stopping it from the first high check froze
a reference of the stream's first few dozen images while early training made every check
high, and a confirmation then cut a stationary stream). At a drift boundary the change point is located inside the
window (`change_point`), and only the part after it becomes the new reference: a window
that straddled the change would otherwise start the next experience with a mixed reference.
Every embedding carries its stream position (stream images fed before it), so a drift
boundary also says how many of the ended experience's last images came after the change
point (`boundary`'s return): the caller can hand them to the next experience, since a cut
comes a few hundred images after the change it found.

Usage::

    detector = DriftDetector(window=32, reference=64, threshold=6.0, patience=3)
    for images, sample in stream:              # sample: (n, 3, S, S) of `images`; embed: (n, ...) -> (n, D)
        z = detector.update(embed(sample), images=len(images), inputs=sample, embed=embed)
        if z is not None:                      # a drift boundary: end the experience
            handed_on = detector.boundary("drift")   # stream images after the change point
    torch.save(detector.state_dict(), path)    # tensors only (safetensors-compatible)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

REASONS = ("header", "count", "drift")
KEPT = ("recent", "past", "recent_inputs", "past_inputs", "recent_positions", "past_positions")  # aligned by row
BANDWIDTH_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)  # of the mean pairwise squared distance; each half the next


class DriftDetector:
    """Sliding two-window kernel MMD test with a permutation z-score, patience, min length and cool-down."""

    def __init__(self, window: int = 32, reference: int = 64, threshold: float = 6.0, patience: int = 3,
                 permutations: int = 100, min_images: int = 256, cooldown_images: int = 256,
                 check_every: int = 4, seed: int = 0) -> None:
        if window < 2 or reference < window or patience < 1 or permutations < 10:
            raise ValueError("need window >= 2, reference >= window, patience >= 1, permutations >= 10")
        self.window, self.reference, self.threshold, self.patience = window, reference, threshold, patience
        self.permutations, self.min_images, self.cooldown_images = permutations, min_images, cooldown_images
        self.check_every, self.seed = check_every, seed
        self.recent: Tensor | None = None  # (<= window, D) newest embeddings
        self.past: Tensor | None = None  # (<= reference, D) the experience's embeddings before `recent`
        self.recent_inputs: Tensor | None = None  # (<= window, ...) what `recent` was embedded from, if given
        self.past_inputs: Tensor | None = None  # (<= reference, ...) likewise for `past`
        self.recent_positions: Tensor | None = None  # (<= window,) int64 stream images fed before each of `recent`
        self.past_positions: Tensor | None = None  # (<= reference,) likewise for `past`
        self.images_seen = 0  # stream images fed so far (all experiences)
        self.statistic = 0.0  # z-score of the last check
        self.streak = 0  # consecutive checks above the threshold
        self.images_in_experience = 0
        self.images_since_drift = cooldown_images  # no drift boundary yet: not cooling down
        self.since_check = 0  # embeddings added since the last check
        self.checks = 0  # tests run so far
        self._bank: tuple[int, int, Tensor] | None = None  # (m, n, (P+1, m+n) weights) of the last sizes tested

    def update(self, features: Tensor, images: int, inputs: Tensor | None = None,
               embed: Callable[[Tensor], Tensor] | None = None) -> float | None:
        """Add embeddings (n, D) of a sample of `images` stream images; the z-score when a boundary is due.

        With `inputs` (n, ...) (what the embeddings were computed from; pass them always or
        never) and `embed`, a boundary is confirmed first: window and reference are embedded
        again by `embed` (the encoder as it is now, when the stored embeddings came from older
        versions of a model in training) and tested once more; no boundary if z falls back.
        """
        features = features.detach().float().cpu()
        positions = self.images_seen + torch.arange(len(features)) * images // max(len(features), 1)  # (n,) evenly spread
        self.images_in_experience += images
        self.images_since_drift += images
        self.images_seen += images
        if len(features):
            self._push({"recent": features, "recent_inputs": inputs, "recent_positions": positions})
            self.since_check += len(features)
        if self.since_check < self.check_every or not self.ready():
            return None
        self.since_check = 0
        self.statistic = self.test()
        self.streak = self.streak + 1 if self.statistic > self.threshold else 0
        due = (self.streak >= self.patience and self.images_in_experience >= self.min_images
               and self.images_since_drift >= self.cooldown_images)
        if due and embed is not None and self.recent_inputs is not None and self.past_inputs is not None:
            self.recent, self.past = embed(self.recent_inputs).float().cpu(), embed(self.past_inputs).float().cpu()
            self.statistic = self.test()
            if self.statistic <= self.threshold:
                self.streak = 0
                return None
        return self.statistic if due else None

    def ready(self) -> bool:
        """A full window and a reference of at least a quarter window (after a drift boundary the
        reference starts as the window's post-change part): enough to test."""
        return (self.recent is not None and len(self.recent) >= self.window
                and self.past is not None and len(self.past) >= max(2, self.window // 4))

    def boundary(self, reason: str) -> int:
        """An experience ended for `reason`: drift keeps the window's part after the change point
        (the new distribution) as the new reference, a header change forgets everything, a count
        cut keeps everything. Returns how many of the ended experience's last stream images came
        after the change point (0 unless drift: the cut itself is the change; at most the
        experience's images, as the reference may reach into the one before a count cut)."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}")
        ended, self.images_in_experience, self.streak = self.images_in_experience, 0, 0
        handed_on = 0
        if reason == "drift":
            self.images_since_drift = 0
            start = 0
            if self.recent is not None and self.past is not None and len(self.past):
                change = self.change_point()  # in the reference, then window
                position = int(torch.cat([self.past_positions, self.recent_positions])[change])
                handed_on = min(self.images_seen - position, ended)
                start = max(0, change - len(self.past))
            self.past = self.recent[start:] if self.recent is not None else None
            self.past_inputs = self.recent_inputs[start:] if self.recent_inputs is not None else None
            self.past_positions = self.recent_positions[start:] if self.recent_positions is not None else None
            self.recent = self.recent_inputs = self.recent_positions = None
        elif reason == "header":
            self.past = self.recent = self.past_inputs = self.recent_inputs = None
            self.past_positions = self.recent_positions = None
        return handed_on

    def change_point(self) -> int:
        """Where the new distribution starts among the kept embeddings in stream order (reference,
        then window; an index into both): the split that best separates embeddings more like the
        reference (before) from those more like the window's newest quarter (after, assumed new).
        How alike is measured against the midpoint of the reference's own and the newest quarter's
        own scores. The newest quarter counts as new. The reference is searched too: a shift cut
        late (its first checks below the threshold) has slid into the reference's newest part."""
        y, x = self.past, self.recent  # (n, D) older, (m, D) newer
        n, total = len(y), len(y) + len(x)
        tail = max(1, len(x) // 4)
        kernel = self._kernel(torch.cat([y, x])).fill_diagonal_(0)  # (n+m, n+m), no self-similarity
        like_old = kernel[:, :n].mean(1) - kernel[:, total - tail:].mean(1)  # (n+m,) reference minus newest
        midpoint = (like_old[:n].mean() + like_old[total - tail:].mean()) / 2
        score = like_old - midpoint  # (n+m,) > 0: an embedding of the old distribution
        before = torch.cat([torch.zeros(1), score.cumsum(0)])  # (n+m+1,) score of the first t
        return min(int(torch.argmax(2 * before - score.sum())), total - tail)

    def test(self) -> float:
        """z-score of MMD²(recent, past) against its permutation null (0 when the null is degenerate).

        Runs on one intra-op thread: at this size (a few hundred rows) more threads only add
        synchronisation, which on a busy 2-core box made a test 10x slower (25 ms vs 2.3 ms).
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._z_score()
        finally:
            torch.set_num_threads(threads)

    def _z_score(self) -> float:
        x, y = self.recent, self.past  # (m, D), (n, D)
        kernel = self._kernel(torch.cat([x, y]))  # (m+n, m+n)
        self.checks += 1
        weights = self._permutation_weights(len(x), len(y))  # (P+1, m+n), MMD² = wᵀ K w
        mmd = ((weights @ kernel) * weights).sum(1)  # (P+1,): row 0 observed, then the null
        null = mmd[1:]
        spread = null.std()
        if not math.isfinite(float(spread)) or float(spread) <= 1e-12:
            return 0.0
        return float((mmd[0] - null.mean()) / spread)

    def _permutation_weights(self, m: int, n: int) -> Tensor:
        """(P+1, m+n): +1/m on the window's rows, -1/n on the reference's; row 0 as observed, then
        `permutations` random relabellings. Drawn once per (m, n) from the seed and reused while the
        sizes stay (drawing them was half of a test's time); each test stays a valid permutation test."""
        if self._bank is None or self._bank[:2] != (m, n):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + m * 4099 + n)
            order = torch.rand(self.permutations, m + n, generator=generator).argsort(1)  # (P, m+n)
            labels = torch.cat([torch.arange(m + n).unsqueeze(0), order]) < m  # (P+1, m+n)
            self._bank = (m, n, torch.where(labels, 1.0 / m, -1.0 / n))
        return self._bank[2]

    @staticmethod
    def _kernel(pooled: Tensor) -> Tensor:
        """(N, D) -> (N, N): the sum of Gaussian kernels at `BANDWIDTH_SCALES` x the mean pairwise
        squared distance. The scales halve, so each kernel is the square of the next wider one
        (one exp instead of five), computed in place (N² floats are the test's memory traffic)."""
        norms = pooled.pow(2).sum(1)  # (N,)
        distances = torch.addmm(norms.unsqueeze(1) + norms, pooled, pooled.T, alpha=-2).clamp_min_(0)  # (N, N) squared
        bandwidth = (distances.sum() / (len(pooled) * (len(pooled) - 1))).clamp_min(1e-12)
        kernel = distances.mul_(-1.0 / (float(bandwidth) * BANDWIDTH_SCALES[-1])).exp_()  # the widest scale
        total = kernel.clone()
        for _ in BANDWIDTH_SCALES[:-1]:
            total.add_(kernel.mul_(kernel))  # exp(-d / (b s)) squared = exp(-d / (b s / 2))
        return total

    def _push(self, rows: dict[str, Tensor | None]) -> None:
        """Append aligned rows (`recent`, `recent_inputs`, `recent_positions`) to the window; what
        leaves it joins the reference (`past...`), whose oldest leave it."""
        overflow = (len(self.recent) if self.recent is not None else 0) + len(rows["recent"]) - self.window
        for key, new in rows.items():
            recent, older = _cat(getattr(self, key), new), key.replace("recent", "past")
            if overflow > 0 and recent is not None:
                if self.streak < self.patience:  # a due shift held back: the reference keeps the old distribution
                    setattr(self, older, _cat(getattr(self, older), recent[:overflow])[-self.reference:])
                recent = recent[overflow:]
            setattr(self, key, recent)

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to continue after a restart, as tensors (a safetensors file)."""
        counters = [self.streak, self.images_in_experience, self.images_since_drift, self.since_check, self.checks,
                    self.images_seen]
        state = {"counters": torch.tensor(counters, dtype=torch.int64),
                 "statistic": torch.tensor([self.statistic], dtype=torch.float64)}
        for key in KEPT:
            if getattr(self, key) is not None:
                state[key] = getattr(self, key).contiguous()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`'s output (the configuration comes from the constructor). A state
        written before positions were kept gets them all at its last image: nothing is handed on."""
        counters = [int(v) for v in state["counters"].tolist()]
        (self.streak, self.images_in_experience, self.images_since_drift, self.since_check,
         self.checks) = counters[:5]
        self.images_seen = counters[5] if len(counters) > 5 else 0
        self.statistic = float(state["statistic"][0])
        for key in KEPT:
            setattr(self, key, state.get(key))
        for key in ("recent", "past"):
            if getattr(self, key) is not None and getattr(self, f"{key}_positions") is None:
                setattr(self, f"{key}_positions", torch.full((len(getattr(self, key)),), self.images_seen))


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """`a` then `b` along rows, either may be None."""
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b])
