"""Hooks the train step calls on a regularizer, and the shared quadratic anchor penalty.

A regularizer keeps an encoder close to what it learned on earlier experiences,
without labels. The train step calls, in order, per step: ``penalty`` (added to
the SSL loss), ``after_backward`` (grads populated), ``after_step`` (params
updated); and ``on_experience_end`` once per experience. State is a flat
``dict[str, Tensor]`` so it saves to ``regularizer.safetensors`` without pickle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor], Tensor]
"""A batch of views (2B, 3, R, R) -> its scalar SSL loss: what `on_experience_end` receives."""


def trainable(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """The backbone's parameters that train, by name (what regularizers anchor)."""
    return {n: p for n, p in backbone.named_parameters() if p.requires_grad}


def parameter_copy(backbone: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the trainable parameters."""
    return {n: p.detach().clone() for n, p in trainable(backbone).items()}


def prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{prefix + name: tensor}``, detached and contiguous (safetensors refuses strided
    tensors, e.g. channels_last weights)."""
    return {f"{prefix}{n}": t.detach().contiguous() for n, t in tensors.items()}


def with_prefix(
    state: dict[str, Tensor], prefix: str, device: torch.device | None = None
) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, prefix stripped, on ``device``."""
    return {k[len(prefix) :]: v.to(device) for k, v in state.items() if k.startswith(prefix)}


def move_all(tensors: dict[str, Tensor], device: torch.device | str) -> None:
    """Move every tensor of the dict to ``device``, in place in the dict."""
    for name, t in tensors.items():
        tensors[name] = t.to(device)


def device_of(backbone: nn.Module | None) -> torch.device | None:
    """Where the backbone's parameters live (``None`` for no backbone)."""
    return None if backbone is None else next(backbone.parameters()).device


def mean_gradient_stat(
    backbone: nn.Module,
    batches: Iterable[Tensor],
    loss_fn: LossFn,
    stat: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """Mean over batches of ``stat(d loss_fn(batch) / d theta)`` per trainable parameter.

    Uses ``torch.autograd.grad`` so the parameters' ``.grad`` stay untouched; a
    batch with a non-finite loss is skipped. No batches gives zeros.
    """
    params = trainable(backbone)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    with torch.enable_grad():
        for views in batches:
            loss = loss_fn(views)
            if not torch.isfinite(loss):
                continue
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, grad in zip(params, grads, strict=True):
                if grad is not None:
                    total[name] += stat(grad.float())
            count += 1
    return {n: t / max(count, 1) for n, t in total.items()}


class Regularizer:
    """Base class: every hook is a no-op, so a subclass overrides only what it needs.

    ``penalty_weight`` is lambda, the factor on the penalty.
    """

    def __init__(self, penalty_weight: float) -> None:
        self.penalty_weight = float(penalty_weight)

    def penalty(self, backbone: nn.Module, views: Tensor, features: Tensor) -> Tensor:
        """Scalar added to the SSL loss; ``views`` (B,3,R,R) fed the backbone, ``features`` (B,D)."""
        return features.new_zeros((), dtype=torch.float32)

    def after_backward(self, backbone: nn.Module) -> None:
        """Called once grads are populated (and unscaled, under AMP), before the step."""

    def after_step(self, backbone: nn.Module) -> None:
        """Called once the optimizer has updated the parameters."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters the optimizer must update (e.g. a predictor)."""
        return []

    def to(self, device: torch.device | str) -> Regularizer:
        """Move the held state to ``device`` (in place, parameters keep their identity)."""
        return self

    def on_experience_end(self, backbone: nn.Module, loss_fn: LossFn, batches: Iterable[Tensor]) -> None:
        """Called at each experience end; ``loss_fn(views)`` is a batch's SSL loss."""

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors (hyper-parameters as 0-d tensors); safetensors-compatible."""
        return {"penalty_weight": torch.tensor(self.penalty_weight)}

    def load_state_dict(self, state: dict[str, Tensor], backbone: nn.Module | None = None) -> None:
        """Restore ``state_dict()``'s output; the saved hyper-parameters win over the constructor's.

        ``backbone`` (the current one) places the tensors on its device; regularizers
        holding a model copy also use it as the template to rebuild that copy.
        """
        self.penalty_weight = float(state["penalty_weight"])


class QuadraticRegularizer(Regularizer):
    """``scale * penalty_weight * sum_i importance_i * (theta_i - anchor_i)^2``.

    Shared by EWC, MAS, SI and L2: they differ only in the importance weights
    (``None`` = all ones, for L2) and ``scale`` (1/2 for EWC/MAS). Before the first
    anchor (no experience ended yet) the penalty is exactly 0.
    """

    scale = 1.0

    def __init__(self, penalty_weight: float) -> None:
        super().__init__(penalty_weight)
        self.anchor: dict[str, Tensor] = {}
        self.importance: dict[str, Tensor] | None = None

    def penalty(self, backbone: nn.Module, views: Tensor, features: Tensor) -> Tensor:
        total = features.new_zeros((), dtype=torch.float32)
        if not self.anchor:
            return total
        for name, p in trainable(backbone).items():
            anchor = self._on_device(self.anchor, name, p.device)
            diff2 = (p.float() - anchor).pow(2)
            if self.importance is not None:
                diff2 = diff2 * self._on_device(self.importance, name, p.device)
            total = total + diff2.sum()
        return total * (self.scale * self.penalty_weight)

    def to(self, device: torch.device | str) -> QuadraticRegularizer:
        move_all(self.anchor, device)
        move_all(self.importance or {}, device)
        return self

    @staticmethod
    def _on_device(tensors: dict[str, Tensor], name: str, device: torch.device) -> Tensor:
        """``tensors[name]``, moved (once, in place in the dict) to ``device``."""
        t = tensors[name]
        if t.device != device:
            t = tensors[name] = t.to(device)
        return t

    def blend_importance(self, new: dict[str, Tensor], keep: float, add: float) -> None:
        """``importance = keep * old + add * new``; just ``new`` when nothing is accumulated yet."""
        if self.importance:
            old = self.importance
            new = {n: keep * self._on_device(old, n, t.device) + add * t for n, t in new.items()}
        self.importance = new

    def set_anchor(self, backbone: nn.Module) -> None:
        """Anchor at the backbone's current weights (float32 copies)."""
        self.anchor = {n: p.float() for n, p in parameter_copy(backbone).items()}

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        state.update(prefixed("anchor.", self.anchor))
        if self.importance is not None:
            state.update(prefixed("importance.", self.importance))
        return state

    def load_state_dict(self, state: dict[str, Tensor], backbone: nn.Module | None = None) -> None:
        super().load_state_dict(state, backbone)
        device = device_of(backbone)
        self.anchor = with_prefix(state, "anchor.", device)
        if self.importance is not None or any(k.startswith("importance.") for k in state):
            self.importance = with_prefix(state, "importance.", device)
