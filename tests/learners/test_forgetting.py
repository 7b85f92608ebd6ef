"""ACC / BWT / average forgetting on hand-computed accuracy matrices, cross-checked with Avalanche."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from learners.forgetting import average_accuracy, average_forgetting, backward_transfer

# R[i][j]: accuracy on probe set j after experience i. The diagonal is each column's best.
MONOTONE = [
    [0.90],
    [0.70, 0.80],
    [0.75, 0.60, 0.85],
    [0.50, 0.65, 0.70, 0.95],
]
# Probe set 1 improves after experience 2 (0.80 -> 0.90) before dropping to 0.65.
RECOVERED = [
    [0.90],
    [0.70, 0.80],
    [0.75, 0.90, 0.85],
    [0.50, 0.65, 0.70, 0.95],
]


def test_hand_computed_values():
    # ACC = (0.50 + 0.65 + 0.70 + 0.95) / 4
    assert average_accuracy(MONOTONE) == pytest.approx(0.70)
    # BWT = ((0.50-0.90) + (0.65-0.80) + (0.70-0.85)) / 3 = -0.70 / 3
    assert backward_transfer(MONOTONE) == pytest.approx(-0.70 / 3)
    # forgetting = ((0.90-0.50) + (0.80-0.65) + (0.85-0.70)) / 3
    assert average_forgetting(MONOTONE) == pytest.approx(0.70 / 3)
    # BWT only looks at R[j][j]: unchanged. Forgetting uses the best earlier value:
    # ((0.90-0.50) + (0.90-0.65) + (0.85-0.70)) / 3 = 0.80 / 3
    assert backward_transfer(RECOVERED) == pytest.approx(-0.70 / 3)
    assert average_forgetting(RECOVERED) == pytest.approx(0.80 / 3)


def test_first_experience_has_accuracy_but_no_transfer_or_forgetting():
    assert average_accuracy([[0.9]]) == pytest.approx(0.9)
    assert backward_transfer([[0.9]]) is None and average_forgetting([[0.9]]) is None
    assert average_accuracy([]) is None


def test_missing_entries_are_skipped():
    no_label = [row[:] for row in MONOTONE]
    no_label[3][1] = None  # probe set 1 not evaluated at the end
    assert average_accuracy(no_label) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert backward_transfer(no_label) == pytest.approx(((0.50 - 0.90) + (0.70 - 0.85)) / 2)
    assert average_forgetting(no_label) == pytest.approx(((0.90 - 0.50) + (0.85 - 0.70)) / 2)
    late = [row[:] for row in RECOVERED]
    late[1][1] = None  # probe set 1 first evaluated after experience 2
    # BWT drops j=1 (no R[1][1]); forgetting still has R[2][1] = 0.90 as the earlier best.
    assert backward_transfer(late) == pytest.approx(((0.50 - 0.90) + (0.70 - 0.85)) / 2)
    assert average_forgetting(late) == pytest.approx(0.80 / 3)
    assert average_accuracy([[0.9], [None, None]]) is None


def test_entries_for_probe_sets_newer_than_the_row_are_ignored():
    padded = [row + [0.99] * (4 - len(row)) for row in RECOVERED]  # R[i][j] for j > i
    assert average_forgetting(padded) == pytest.approx(0.80 / 3)
    assert backward_transfer(padded) == pytest.approx(-0.70 / 3)


# --- Avalanche cross-check ---------------------------------------------------
# Avalanche 0.6's StreamForgetting is mean_j (first accuracy on j, measured right
# after training on j, minus the last one), over j evaluated both then and now:
# that is -BWT here. Its StreamBWT is BWT. Our average forgetting takes the max
# over all earlier rows instead, so it equals Avalanche's only where the
# diagonal is each column's best (MONOTONE), and is larger otherwise (RECOVERED).


def avalanche_stream_metrics(R, monkeypatch, tmp_path) -> list[tuple[float, float]]:
    """Replay R through Avalanche's StreamForgetting/StreamBWT plugin hooks.

    After training experience i, experiences j <= i with ``R[i][j] is not None``
    are evaluated on 20 samples of which ``20 * R[i][j]`` are right. Returns
    (forgetting, bwt) after each evaluation round i >= 1.
    """
    monkeypatch.setenv("HOME", str(tmp_path))  # Avalanche writes ~/.avalanche/config.json
    metrics = pytest.importorskip(
        "avalanche.evaluation.metrics", reason="avalanche-lib (extra 'dev') not installed"
    )
    plugins = [metrics.StreamForgetting(), metrics.StreamBWT()]
    stream = SimpleNamespace(name="test")
    strategy = SimpleNamespace(is_eval=True, clock=SimpleNamespace(train_iterations=0))
    results = []
    for i, row in enumerate(R):
        strategy.experience = SimpleNamespace(current_experience=i, origin_stream=stream)
        for plugin in plugins:
            plugin.before_training_exp(strategy)
            plugin.before_eval(strategy)
        for j, accuracy in enumerate(row[: i + 1]):
            if accuracy is None:
                continue
            correct = round(20 * accuracy)
            strategy.experience = SimpleNamespace(current_experience=j, origin_stream=stream)
            strategy.mb_y = torch.zeros(20, dtype=torch.long)
            strategy.mb_output = (torch.arange(20) >= correct).long()
            for plugin in plugins:
                plugin.before_eval_exp(strategy)
                plugin.after_eval_iteration(strategy)
                plugin.after_eval_exp(strategy)
        values = [plugin.after_eval(strategy)[0].value for plugin in plugins]
        if i >= 1:
            results.append((values[0], values[1]))
    return results


@pytest.mark.parametrize("R", [MONOTONE, RECOVERED], ids=["monotone", "recovered"])
def test_bwt_matches_avalanche_after_every_experience(R, monkeypatch, tmp_path):
    for T, (forgetting, bwt) in enumerate(avalanche_stream_metrics(R, monkeypatch, tmp_path), 1):
        ours = backward_transfer(R[: T + 1])
        assert bwt == pytest.approx(ours) and forgetting == pytest.approx(-ours)
        assert average_forgetting(R[: T + 1]) >= forgetting - 1e-9


def test_average_forgetting_matches_avalanche_where_the_diagonal_is_the_best(monkeypatch, tmp_path):
    avalanche = avalanche_stream_metrics(MONOTONE, monkeypatch, tmp_path)
    for T, (forgetting, _) in enumerate(avalanche, 1):
        assert average_forgetting(MONOTONE[: T + 1]) == pytest.approx(forgetting)
    recovered = avalanche_stream_metrics(RECOVERED, monkeypatch, tmp_path)
    assert recovered[-1][0] == pytest.approx(0.70 / 3)  # Avalanche ignores the 0.90 peak
    assert average_forgetting(RECOVERED) == pytest.approx(0.80 / 3)


def test_missing_entries_match_avalanche_skipping_those_evaluations(monkeypatch, tmp_path):
    late = [row[:] for row in RECOVERED]
    late[1][1] = None
    late[3][2] = None
    (_, bwt) = avalanche_stream_metrics(late, monkeypatch, tmp_path)[-1]
    assert bwt == pytest.approx(backward_transfer(late)) == pytest.approx(0.50 - 0.90)
