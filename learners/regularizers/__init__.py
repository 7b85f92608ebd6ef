"""Label-free regularizers against forgetting, and the strategy names that select them.

Usage::

    replay, name = parse_strategy("replay+ewc")  # (True, "ewc")
    reg = build_regularizer(name, lam=100.0)     # OnlineEWC, or None for plain/replay
"""

from __future__ import annotations

from typing import Any

from learners.regularizers.base import QuadraticRegularizer, Regularizer
from learners.regularizers.distill import Distill
from learners.regularizers.ewc import OnlineEWC
from learners.regularizers.l2 import L2
from learners.regularizers.mas import MAS
from learners.regularizers.si import SI

REGULARIZERS: dict[str, type[Regularizer]] = {
    "ewc": OnlineEWC,
    "mas": MAS,
    "si": SI,
    "l2": L2,
    "distill": Distill,
}
"""Regularizer classes by strategy name."""

DEFAULT_LAMBDA: dict[str, float] = {"ewc": 100.0, "mas": 1.0, "si": 1.0, "l2": 0.01, "distill": 1.0}
"""Starting points only: the right lambda depends on the loss scale and the model."""

WITHOUT_REGULARIZER = ("naive", "replay")
STRATEGIES = (*WITHOUT_REGULARIZER, *REGULARIZERS, *(f"replay+{n}" for n in REGULARIZERS))
"""Every accepted strategy string."""


def parse_strategy(strategy: str) -> tuple[bool, str | None]:
    """``"replay+distill"`` -> ``(True, "distill")``, ``"replay"`` -> ``(True, None)``,
    ``"ewc"`` -> ``(False, "ewc")``, ``"naive"`` -> ``(False, None)``; else ValueError."""
    name = strategy.strip().lower()
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    replay = name.startswith("replay")
    regularizer = name.removeprefix("replay").removeprefix("+") or None
    return replay, None if regularizer == "naive" else regularizer


def build_regularizer(
    name: str, lam: float | None = None, feature_dim: int | None = None, **kwargs: Any
) -> Regularizer | None:
    """The regularizer called ``name`` (``None`` for "naive"/"replay").

    ``lam`` defaults to ``DEFAULT_LAMBDA[name]``; ``feature_dim`` (the backbone's
    output size) is used by "distill" only, so callers may always pass it;
    ``kwargs`` go to the class (e.g. ``gamma`` for EWC, ``xi`` for SI).
    """
    key = name.strip().lower()
    if key in WITHOUT_REGULARIZER:
        return None
    if key not in REGULARIZERS:
        allowed = ", ".join((*WITHOUT_REGULARIZER, *REGULARIZERS))
        raise ValueError(f"unknown regularizer {name!r}; allowed: {allowed}")
    lam = DEFAULT_LAMBDA[key] if lam is None else lam
    if key == "distill":
        if feature_dim is None:
            raise ValueError(
                "the distill regularizer needs feature_dim (the backbone's output size)"
            )
        kwargs["feature_dim"] = feature_dim
    return REGULARIZERS[key](lam, **kwargs)


__all__ = [
    "DEFAULT_LAMBDA",
    "L2",
    "MAS",
    "REGULARIZERS",
    "SI",
    "STRATEGIES",
    "Distill",
    "OnlineEWC",
    "QuadraticRegularizer",
    "Regularizer",
    "build_regularizer",
    "parse_strategy",
]
