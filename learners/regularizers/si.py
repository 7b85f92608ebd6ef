"""Synaptic Intelligence: importance = each weight's contribution to the loss decrease along its path.

Usage::

    reg = SI(lam=1.0, xi=0.1)
    loss = ssl_loss + reg.penalty(backbone, views, features)
    loss.backward(); reg.after_backward(backbone)
    optimizer.step(); reg.after_step(backbone)
    reg.on_experience_end(backbone, loss_fn, batches)  # loss_fn/batches unused

References: Zenke, Poole & Ganguli 2017 (Continual Learning Through Synaptic Intelligence).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from learners.regularizers.base import (
    LossFn,
    QuadraticRegularizer,
    device_of,
    move_all,
    parameter_copy,
    prefixed,
    trainable,
    with_prefix,
)


class SI(QuadraticRegularizer):
    """``lam * sum Omega (theta - theta*)^2`` with the path-integral importance.

    Per step ``omega += -g * (theta_after - theta_before)``, ``g`` = the gradient seen
    in ``after_backward`` (of the SSL loss plus penalty; it must be unscaled when a
    GradScaler is used; non-finite entries count as 0). At an experience end
    ``Omega += max(omega, 0) / (Delta^2 + xi)``, ``Delta`` = the change of the weights
    over the experience; then ``omega`` restarts and ``theta*`` = current weights.
    Clamping ``omega`` at 0 keeps the penalty nonnegative.
    """

    def __init__(self, lam: float, xi: float = 0.1) -> None:
        super().__init__(lam)
        self.xi = float(xi)
        self.importance = {}
        self.omega: dict[str, Tensor] = {}
        self.start: dict[str, Tensor] = {}  # weights at the first step, until the first anchor
        self._grads: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}  # weights before the pending step

    def after_backward(self, backbone: nn.Module) -> None:
        params = trainable(backbone)
        if not self.start and not self.anchor:
            self.start = {n: p.detach().float().clone() for n, p in params.items()}
        self._grads = {
            n: p.grad.detach().float().nan_to_num(0.0, 0.0, 0.0)
            for n, p in params.items()
            if p.grad is not None
        }
        self._before = parameter_copy(backbone)

    def after_step(self, backbone: nn.Module) -> None:
        for name, p in trainable(backbone).items():
            grad = self._grads.get(name)
            if grad is None:
                continue
            step = p.detach().float() - self._before[name].float()
            contribution = -grad * step
            if name in self.omega:
                self.omega[name] += contribution
            else:
                self.omega[name] = contribution
        self._grads, self._before = {}, {}

    def on_experience_end(self, backbone: nn.Module, loss_fn: LossFn, batches: Iterable[Tensor]) -> None:
        reference = self.anchor or self.start  # the weights when this experience began
        new = {}
        for name, p in trainable(backbone).items():
            delta = p.detach().float() - reference.get(name, p.detach().float()).to(p.device)
            omega = self.omega.get(name, torch.zeros_like(delta)).to(p.device)
            new[name] = omega.clamp(min=0) / (delta.pow(2) + self.xi)
        self.blend_importance(new, keep=1.0, add=1.0)
        self.set_anchor(backbone)
        self.start, self.omega = {}, {}

    def to(self, device: torch.device | str) -> SI:
        super().to(device)
        move_all(self.omega, device)
        move_all(self.start, device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        state = {**super().state_dict(), "xi": torch.tensor(self.xi)}
        state.update(prefixed("omega.", self.omega))
        state.update(prefixed("start.", self.start))
        return state

    def load_state_dict(self, state: dict[str, Tensor], backbone: nn.Module | None = None) -> None:
        super().load_state_dict(state, backbone)
        self.xi = float(state["xi"])
        device = device_of(backbone)
        self.omega = with_prefix(state, "omega.", device)
        self.start = with_prefix(state, "start.", device)
        self._grads, self._before = {}, {}
