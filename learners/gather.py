"""All ranks' rows of a tensor, with gradients flowing back to their owners.

Contrastive losses compare each anchor against the whole global batch (SimCLR's negatives),
so under data parallelism every rank needs every other rank's embeddings, and the gradient
of those negatives must reach the rank that made them: `_GatherLayer` is the usual autograd
all-gather of SimCLR implementations (lightly's and solo-learn's `GatherLayer`). Ranks here
hold unequal batches (partitions deliver unevenly), so rows are padded to the largest batch,
gathered, and the padding cut off again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for a part and returns it to its owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)  # (W, B, ...): every rank's gradient for every part
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(every rank's rows of `x` in rank order, where this rank's rows start in them).

    x: (B_r, ...) on this rank -> (sum_r B_r, ...). Differentiable: the gradient of the
    result with respect to rank r's rows is summed over ranks and returned to rank r.
    Every rank must call it at the same point (it is a collective).
    """
    if not distributed():
        return x, 0
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = torch.cat(sizes).tolist()  # one host sync, not one per rank
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(counts) - x.shape[0]))
    parts = _GatherLayer.apply(padded)  # W tensors (max B, ...), differentiable
    rows = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
    return rows, sum(counts[: dist.get_rank()])
