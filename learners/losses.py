"""SSL losses, one class per loss (in the style of lightly's ``lightly.loss``).

Both losses compute in float32 even under bf16 autocast: normalization and
the softmax over similarities are where low precision hurts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learners.gather import gather_rows


class NegativeCosineSimilarity(nn.Module):
    """Mean negative cosine similarity, ``-cos(x0, x1)``, in [-1, 1] (SimSiam, BYOL).

    The stop-gradient on the target branch is the caller's job (pass
    ``z.detach()``), because which side is the target depends on the method.

    Example::

        criterion = NegativeCosineSimilarity()
        p1, z2 = predictor(projector(f1)), projector(f2)   # (B, D) each
        loss = criterion(p1, z2.detach())                  # scalar, -1 when aligned
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(x0.float(), x1.float(), dim=self.dim, eps=self.eps).mean()


class NTXentLoss(nn.Module):
    """Normalized temperature-scaled cross entropy (SimCLR's contrastive loss).

    For a batch of B pairs ``(z0[i], z1[i])`` each of the 2B embeddings has
    one positive (its pair) and 2B - 2 negatives (every other embedding in
    both views). The loss is the mean over all 2B anchors of
    ``-log(exp(sim(a, pos) / T) / sum_{k != a} exp(sim(a, k) / T))``, with
    ``sim`` the cosine similarity.

    With ``gather=True`` under data parallelism, this rank's anchors are compared with
    every rank's embeddings (``learners.gather``), so a step over W ranks has the negatives
    of one step over the whole global batch; all ranks must call it together.

    Example::

        criterion = NTXentLoss(temperature=0.5)
        z0, z1 = projector(backbone(view1)), projector(backbone(view2))  # (B, D)
        loss = criterion(z0, z1)                                          # scalar
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z0: torch.Tensor, z1: torch.Tensor, gather: bool = False) -> torch.Tensor:
        b = z0.shape[0]
        local = F.normalize(torch.cat([z0, z1]).float(), dim=1)  # (2B, D): this rank's anchors
        pairs = local.view(2, b, -1).transpose(0, 1)  # (B, 2, D): both views of each image
        pairs, offset = gather_rows(pairs) if gather else (pairs, 0)  # (N, 2, D), N = global B
        n = pairs.shape[0]
        keys = torch.cat([pairs[:, 0], pairs[:, 1]])  # (2N, D): all first views, then all second
        logits = local @ keys.T / self.temperature  # (2B, 2N)
        rows = torch.arange(b, device=local.device) + offset  # global index of each local pair
        own = torch.cat([rows, rows + n])  # where each anchor sits among the keys
        logits[torch.arange(2 * b, device=local.device), own] = float("-inf")  # not its own negative
        targets = torch.cat([rows + n, rows])  # the other view of the same image
        return F.cross_entropy(logits, targets)
