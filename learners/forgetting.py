"""Continual-learning summaries of the accuracy matrix R.

``R[i][j]`` = accuracy on probe set j after experience i (0-based; row i holds
at least columns 0..i; ``None`` = not evaluated, e.g. no labels). With T the
last row (``T = len(R) - 1``):

- ACC = mean_{j<=T} R[T][j]
- BWT = mean_{j<T} (R[T][j] - R[j][j])
- average forgetting = mean_{j<T} max_{j<=i<T} (R[i][j] - R[T][j])

Terms with a ``None`` entry are skipped; a metric with no term left is ``None``.
Entries ``R[i][j]`` with ``j > i`` (probe set j did not exist yet) are ignored.

References: Lopez-Paz & Ranzato 2017 (ACC, BWT); Chaudhry et al. 2018 (forgetting).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _entry(R: Matrix, i: int, j: int) -> float | None:
    """``R[i][j]``, or ``None`` if the row is too short or the probe set is newer than i."""
    if j > i or j >= len(R[i]):
        return None
    return R[i][j]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def average_accuracy(R: Matrix) -> float | None:
    """ACC = mean_{j<=T} R[T][j] over the evaluated entries of the last row."""
    if not R:
        return None
    T = len(R) - 1
    return _mean([a for j in range(T + 1) if (a := _entry(R, T, j)) is not None])


def backward_transfer(R: Matrix) -> float | None:
    """BWT = mean_{j<T} (R[T][j] - R[j][j]); negative means forgetting; ``None`` if T == 0."""
    T = len(R) - 1
    terms = []
    for j in range(T):
        last, first = _entry(R, T, j), _entry(R, j, j)
        if last is not None and first is not None:
            terms.append(last - first)
    return _mean(terms)


def average_forgetting(R: Matrix) -> float | None:
    """mean_{j<T} max_{j<=i<T} (R[i][j] - R[T][j]) (Chaudhry et al.); ``None`` if T == 0.

    Unlike ``-BWT`` (and Avalanche's ``StreamForgetting``, which is exactly ``-BWT``)
    it compares with the best earlier accuracy on j, not the one right after
    training on j: per probe set it is >= ``R[j][j] - R[T][j]``.
    """
    T = len(R) - 1
    terms = []
    for j in range(T):
        last = _entry(R, T, j)
        earlier = [a for i in range(j, T) if (a := _entry(R, i, j)) is not None]
        if last is not None and earlier:
            terms.append(max(earlier) - last)
    return _mean(terms)
