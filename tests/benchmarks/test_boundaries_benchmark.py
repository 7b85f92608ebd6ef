"""benchmarks/boundaries.py scores switches, false cuts and the on/off cost against the issue's targets."""

from benchmarks.boundaries import summarize


def test_summary_counts_delays_misses_and_compares_on_off_medians():
    switches = [{"switches": [{"delay_images": 260, "extra_cuts": 0}, {"delay_images": None, "extra_cuts": 0},
                              {"delay_images": 520, "extra_cuts": 1}], "detector_share": 0.02,
                 "routing_drift": {"correct_share": 0.75, "majority_share": 0.9},
                 "routing_header": {"correct_share": 1.0, "majority_share": 1.0}},
                {"switches": [], "detector_share": None, "routing_drift": {"correct_share": 0.0, "majority_share": 0.7}}]
    stationary = [{"false_boundaries": 1, "images": 2500, "detector_share": 0.03},
                  {"false_boundaries": 0, "images": 2500, "detector_share": 0.04}]
    rates = {"drift": [170.0, 190.0, 180.0], "count": [200.0, 150.0, 185.0]}
    summary = summarize(switches, stationary, rates)
    assert (summary["switches"], summary["missed"], summary["over_500"]) == (3, 1, 1)
    assert (summary["delay_images_median"], summary["delay_images_max"]) == (520, 520)
    assert summary["extra_cuts_in_switch_streams"] == 1
    assert summary["false_per_10k"] == 2.0
    assert summary["detector_share_of_train_seconds"] == 0.03
    assert summary["images_per_second_on_off_median"] == [180.0, 185.0]  # medians, not the first runs
    assert summary["throughput_cost_on_off"] == round(1 - 180 / 185, 4)
    assert summary["routing_correct_share"] == {"drift": 0.375, "header": 1.0}  # a 0 % seed counts
    assert summary["stored_majority_share"] == {"drift": 0.8, "header": 1.0}


def test_summary_without_on_off_runs():
    summary = summarize([], [], {"drift": [], "count": []})
    assert summary["throughput_cost_on_off"] is None and summary["false_per_10k"] is None
    assert summary["routing_correct_share"] == {"drift": None, "header": None}
    assert summary["stored_majority_share"] == {"drift": None, "header": None}
