"""MoCo v2 (He et al., 2020; Chen et al., 2020): InfoNCE against a queue of momentum-encoded keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learners.device import autocast
from learners.gather import gather_rows
from learners.methods import MethodOutput
from learners.methods.ema import ema_update, frozen_copy


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of queries against their positive key and the queue's negatives.

    q: (B, P) queries (any norm); k: (B, P) unit positive keys; queue: (K, P) unit negatives.
    Computed in float32 even under bf16 autocast (the softmax over K + 1 logits needs it).
    """
    with autocast(q.device, enabled=False):
        q = F.normalize(q.float(), dim=1)  # (B, P)
        positives = (q * k.float()).sum(dim=1, keepdim=True)  # (B, 1)
        negatives = q @ queue.float().T  # (B, K)
        logits = torch.cat([positives, negatives], dim=1) / temperature  # (B, 1 + K)
        targets = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
        return F.cross_entropy(logits, targets)


class MoCo(nn.Module):
    """MoCo v2: query encoder (backbone + MLP head), momentum key encoder, queue of negatives.

    Args:
        backbone: the query encoder (trained; ``feature_dim`` attribute).
        proj_dim: head output. Default ``min(128, feature_dim)`` (128 as in MoCo v2); the
            head is MoCo v2's Linear-ReLU-Linear with ``feature_dim`` hidden units.
        queue_size: K, negatives kept (4096, the usual small-dataset setting).
        momentum: key encoder EMA rate, ``key <- m * key + (1 - m) * query``. Constant,
            like BYOL's here (a stream has no known length for a schedule).
        temperature: InfoNCE temperature (0.2, MoCo v2).

    The loss is symmetrised, ``0.5 * (L(q1, k2) + L(q2, k1))``, as small-batch MoCo
    implementations do (the MoCo authors' CIFAR demo); both views' keys are enqueued.
    ``queue`` (K, P) and ``queue_ptr`` (1,) are buffers, so they live in the state_dict and
    every checkpoint. ``forward`` only remembers the keys; ``after_step`` (called after each
    optimizer step) enqueues them and moves the key encoder, so a skipped (non-finite) step
    or a side computation (probe loss, EWC's Fisher) leaves the queue untouched.
    Under DDP (``data_parallel=True``) every rank's keys are gathered, in rank order, so
    all ranks enqueue the same rows and keep identical queues.

    No shuffle-BN: the key encoder's BatchNorm runs in train mode on this rank's own key
    batch. Shuffle-BN (the MoCo paper, section 3.3) hides from the model that a positive
    key was normalized with the same batch statistics as its query; it needs a cross-rank
    shuffle every step and does nothing for the daemon's usual single rank. Small-batch
    reimplementations (solo-learn's MoCo v2+, lightly) drop it too; if the leak hurts,
    it shows as a falling loss without better kNN accuracy in ``benchmarks/continual.py``.

    Example::

        method = MoCo(ResNet18(width=16, small_stem=True), queue_size=4096, momentum=0.99)
        out = method(view1, view2)        # views (B, 3, R, R) -> MethodOutput(loss, features (B, D))
        out.loss.backward(); optimizer.step()
        method.after_step()               # EMA key encoder, enqueue this step's 2B keys
    """

    def __init__(
        self,
        backbone: nn.Module,
        proj_dim: int | None = None,
        queue_size: int = 4096,
        momentum: float = 0.99,
        temperature: float = 0.2,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if queue_size < 1 or temperature <= 0:
            raise ValueError(f"need queue_size >= 1 and temperature > 0, got {queue_size}, {temperature}")
        feature_dim: int = backbone.feature_dim
        proj_dim = proj_dim or min(128, feature_dim)
        self.momentum, self.temperature = momentum, temperature
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, proj_dim)
        )
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))  # (K, P)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # (1,): oldest row
        self._pending: torch.Tensor | None = None  # (N, P) keys of the last forward

    def forward(
        self, view1: torch.Tensor, view2: torch.Tensor, data_parallel: bool = False
    ) -> MethodOutput:
        """Loss and view1's query-backbone features; with `data_parallel` (a DDP step, called
        on every rank together) the keys kept for the queue are every rank's."""
        f1, f2 = self.backbone(view1), self.backbone(view2)  # (B, D) each
        q1, q2 = self.projector(f1), self.projector(f2)  # (B, P)
        k1, k2 = self._keys(view1), self._keys(view2)  # (B, P), unit, no grad
        loss = 0.5 * (
            info_nce(q1, k2, self.queue, self.temperature) + info_nce(q2, k1, self.queue, self.temperature)
        )
        keys = torch.cat([k1, k2])  # (2B, P)
        self._pending = gather_rows(keys)[0] if data_parallel else keys  # (2N, P), N = global B
        return MethodOutput(loss=loss, features=f1)

    @torch.no_grad()
    def _keys(self, view: torch.Tensor) -> torch.Tensor:
        """Unit float32 keys of `view` (B, 3, R, R) from the momentum encoder: (B, P)."""
        return F.normalize(self.key_projector(self.key_backbone(view)).float(), dim=1)

    @torch.no_grad()
    def after_step(self) -> None:
        """Move the key encoder towards the query encoder, then enqueue the last forward's keys."""
        ema_update(self.key_backbone, self.backbone, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)
        if self._pending is not None:
            self.enqueue(self._pending)
            self._pending = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: `keys` (N, P) overwrite the N oldest rows, wrapping around the ring.

        With N > K only the newest K keys can stay; they land where writing all N one by
        one would leave them. No host sync: the pointer stays on the device.
        """
        size = self.queue.shape[0]
        newest = keys[-size:]  # (min(N, K), P)
        start = self.queue_ptr + (len(keys) - len(newest))  # (1,)
        rows = (start + torch.arange(len(newest), device=keys.device)) % size  # (min(N, K),)
        self.queue.index_copy_(0, rows, newest.to(self.queue.dtype))
        self.queue_ptr.add_(len(keys)).remainder_(size)
