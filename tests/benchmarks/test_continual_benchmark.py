"""benchmarks/continual.py at toy scale: the stream, the floors, equal compute, the shape of R
and of the learning curve, the summaries and the targets (on hand-made summaries)."""

import pytest
import torch

from benchmarks.continual import (
    Config,
    Domain,
    arrival_orders,
    at_least,
    benchmark,
    check_targets,
    load_domain,
    parse_args,
    run_arm,
    summarize,
)
from benchmarks.continual import Run as BenchRun
from learners.protocol import pixel_features, score_probes


def _domain(name: str, seed: int, n_train: int = 24, n_probe: int = 15, classes: int = 3) -> Domain:
    """Class c lights up channel c at 200 over 0-20 noise: trivially separable in pixels."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_probe
    labels = [i % classes for i in range(n)]
    images = torch.randint(0, 20, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    for i, c in enumerate(labels):
        images[i, c] += 200
    return Domain(name, images[:n_train], images[n_train:], [str(c) for c in labels[n_train:]])


def _config(**kwargs) -> Config:
    base = {"domains": ("a", "b"), "seeds": (0,), "steps_per_experience": (2, 2), "batch_size": 8,
            "replay_max_images": 16, "curve_every": 0, "threads": 1}
    return Config(**(base | kwargs))


def test_load_domain_holds_out_a_stratified_deterministic_probe_set():
    domain = load_domain("digits", resolution=32, probe_images=30, limit=120)
    again = load_domain("digits", resolution=32, probe_images=30, limit=120)
    assert domain.train.shape[1:] == (3, 32, 32) and domain.train.dtype == torch.uint8
    assert len(domain.probe) >= 30 and len(domain.train) + len(domain.probe) == 120
    assert len(set(domain.probe_labels)) == 10  # every class is represented
    assert torch.equal(domain.probe, again.probe) and domain.probe_labels == again.probe_labels


def test_arrival_orders_cycle_through_each_domain():
    domains = [_domain("a", 0, n_train=10), _domain("b", 1, n_train=40)]
    small, large = arrival_orders(domains, counts=[25, 30], seed=0)
    assert len(small) == 25 and len(large) == 30
    assert sorted(small[:10].tolist()) == list(range(10))  # a full pass before any repeat
    assert len(set(large.tolist())) == 30


def test_pixels_arm_scores_100_percent_on_separable_classes():
    domains = [_domain("a", 0), _domain("b", 1)]
    run = run_arm("pixels", domains, _config(), seed=0)
    assert run.images == 0
    assert run.rows == [[100.0, 100.0]] and run.linear_rows == [[100.0, 100.0]]
    # on noise with arbitrary labels: exactly the protocol on raw pixels, not some encoder's features
    noise = Domain("n", domains[0].train, torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8,
                   generator=torch.Generator().manual_seed(5)), [str(i % 3) for i in range(30)])
    expected = score_probes(pixel_features(noise.probe), noise.probe_labels)
    run = run_arm("pixels", [noise], _config(domains=("n",)), seed=0)
    assert run.rows == [[100 * expected.knn]] and run.linear_rows == [[100 * expected.linear]]


def test_every_arm_gets_the_same_compute_and_a_lower_triangular_R():
    domains = [_domain("a", 0), _domain("b", 1), _domain("c", 2)]
    config = _config(domains=("a", "b", "c"), steps_per_experience=(2, 1, 3))
    assert config.images_per_arm == 6 * 8
    for arm in ("naive", "replay", "replay+distill", "ewc", "joint", "untrained", "random_bn", "pixels"):
        run = run_arm(arm, domains, config, seed=0)
        if arm in ("untrained", "random_bn", "pixels"):
            assert run.images == 0 and run.seconds == 0
        else:
            assert run.images == config.images_per_arm, arm  # batch always full, replay included
        if arm in ("naive", "replay", "replay+distill", "ewc"):
            assert [len(row) for row in run.rows] == [1, 2, 3], arm
            assert [len(row) for row in run.linear_rows] == [1, 2, 3], arm
        else:
            assert [len(row) for row in run.rows] == [3] and [len(row) for row in run.linear_rows] == [3], arm
        assert all(0 <= a <= 100 for row in run.rows + run.linear_rows for a in row)


def test_untrained_is_the_common_start_of_every_trained_arm():
    domains = [_domain("a", 0), _domain("b", 1)]
    config = _config(curve_every=1)
    untrained = run_arm("untrained", domains, config, seed=0)
    for arm in ("naive", "joint"):
        first = run_arm(arm, domains, config, seed=0).curve[0]
        assert first["step"] == 0 and first["knn"] == untrained.rows[0]


def test_learning_curve_points_and_image_counts():
    domains = [_domain("a", 0), _domain("b", 1)]
    config = _config(steps_per_experience=(4, 3), curve_every=2)
    curve = run_arm("naive", domains, config, seed=0).curve
    # step 0, every 2 steps, and each experience end (steps 4 and 7), each once
    assert [p["step"] for p in curve] == [0, 2, 4, 6, 7]
    assert [p["images"] for p in curve] == [0, 16, 32, 48, 56]
    assert [p["seen"] for p in curve] == [0, 1, 1, 2, 2]
    assert ["linear_seen" in p for p in curve] == [False, False, True, False, True]  # experience ends only
    assert all(len(p["knn"]) == 2 for p in curve)  # kNN on every domain, seen or not
    assert curve[2]["knn_seen"] == curve[2]["knn"][0]
    assert curve[-1]["knn_all"] == pytest.approx(sum(curve[-1]["knn"]) / 2)
    joint = run_arm("joint", domains, config, seed=0).curve
    assert [p["step"] for p in joint] == [0, 2, 4, 6, 7] and [p["images"] for p in joint] == [0, 16, 32, 48, 56]


def test_summarize_means_stds_and_forgetting_over_seeds():
    domains = [_domain("a", 0), _domain("b", 1)]
    runs = [BenchRun(rows=[[80.0], [70.0, 60.0]], linear_rows=[[90.0], [85.0, 75.0]], images=32, seconds=2.0),
            BenchRun(rows=[[60.0], [58.0, 40.0]], linear_rows=[[70.0], [70.0, 65.0]], images=32, seconds=4.0)]
    s = summarize(runs, domains)
    assert s["acc_per_seed"] == [65.0, 49.0] and s["acc"] == 57.0 and s["acc_std"] == pytest.approx(11.31, abs=0.01)
    assert s["avg_forgetting"] == 6.0 and s["bwt"] == -6.0  # (10 + 2) / 2
    assert s["acc_linear"] == 73.75 and s["avg_forgetting_linear"] == 2.5  # (5 + 0) / 2
    assert s["per_domain"]["a"] == {"knn": 64.0, "linear": 77.5, "knn_std": pytest.approx(8.49, abs=0.01),
                                    "linear_std": pytest.approx(10.61, abs=0.01)}
    assert s["R"] == [[70.0], [64.0, 50.0]] and s["images_per_second"] == 12.0


def _arm(knn: float, linear: float, std: float = 0.0, forgetting: float | None = None,
         f_std: float = 0.0, per_domain: dict | None = None) -> dict:
    per_domain = per_domain or {"a": (knn, linear), "b": (knn, linear)}
    return {"acc": knn, "acc_std": std, "acc_linear": linear, "acc_linear_std": std,
            "avg_forgetting": forgetting, "avg_forgetting_std": f_std, "bwt": None if forgetting is None else -forgetting,
            "per_domain": {d: {"knn": k, "linear": li, "knn_std": std, "linear_std": std}
                           for d, (k, li) in per_domain.items()}}


def test_at_least_applies_the_seed_std_rule():
    assert at_least(46, 40, 5, 0.5)["passed"]  # gap 6 >= 5 and > std
    assert not at_least(46, 40, 5, 7.0)["passed"]  # gap 6 >= 5 but within the noise
    assert not at_least(44, 40, 5, 0.0)["passed"]  # gap 4 < 5
    assert at_least(39.5, 40, 0, 1.0)["passed"]  # shortfall 0.5 within the noise
    assert not at_least(38, 40, 0, 1.0)["passed"]  # shortfall 2 beyond it
    assert at_least(40, 41.5, -1, 1.0)["passed"] and not at_least(40, 41.5, -1, 0.2)["passed"]


def test_check_targets_on_hand_made_summaries():
    strategies = {
        "pixels": _arm(38, 50),
        "untrained": _arm(40, 45, std=1.0, per_domain={"a": (60, 60), "b": (20, 30)}),
        "joint": _arm(47, 49.5, std=1.0),
        # replay: +6 kNN (> std 1), +2 linear; on domain b kNN 19.5 vs 20 (shortfall 0.5 <= std 1)
        "replay": _arm(46, 47, std=1.0, forgetting=1.5, f_std=0.5, per_domain={"a": (72.5, 70), "b": (19.5, 24)}),
        "naive": _arm(45, 46, std=1.0, forgetting=4.0, f_std=1.0),
    }
    t = check_targets(strategies, "replay")
    c = t["checks"]
    assert t["default_arm"] == "replay" and t["best_continual"] == "replay" and t["best_strategy"] == "replay"
    assert c["default_ge_untrained_every_domain_knn"]["passed"]  # b: -0.5 within std 1
    assert not c["default_ge_untrained_every_domain_linear"]["passed"]  # b: 24 vs 30
    assert c["default_ge_untrained_plus_5_knn"]["passed"] and c["default_ge_untrained_plus_5_knn"]["gap"] == 6
    assert not c["default_ge_untrained_plus_5_linear"]["passed"]  # +2
    assert c["default_ge_pixels_plus_5_knn"]["passed"]  # +8
    assert c["default_ge_pixels_plus_5_linear"]["passed"] is False  # -3
    assert c["joint_ge_untrained_plus_5_knn"]["passed"] and not c["joint_ge_untrained_plus_5_linear"]["passed"]
    assert c["best_within_1_of_joint_knn"]["passed"]  # 46 vs 47: -1
    assert not c["best_within_1_of_joint_linear"]["passed"]  # 47 vs 49.5: 1.5 short of -1, std 1
    assert c["naive_forgets_2"]["passed"]  # 4 >= 2, > std 1
    assert c["best_strategy_forgetting_le_half_naive"]["passed"]  # 1.5 <= 2, gap 2.5 > std 1
    assert t["all_passed"] is False

    strategies["replay"]["avg_forgetting"] = 2.5  # more than half of naive's
    assert not check_targets(strategies, "replay")["checks"]["best_strategy_forgetting_le_half_naive"]["passed"]
    strategies["naive"]["avg_forgetting_std"] = 5.0  # naive's 4 points of forgetting are now noise
    strategies["replay"]["avg_forgetting"] = 0.0
    c = check_targets(strategies, "replay")["checks"]
    assert not c["naive_forgets_2"]["passed"] and not c["best_strategy_forgetting_le_half_naive"]["passed"]


def test_check_targets_all_pass_and_std_blocks_a_gap():
    strategies = {"pixels": _arm(30, 30), "untrained": _arm(40, 40),
                  "joint": _arm(50, 50), "replay": _arm(49.5, 49.2, forgetting=0.5),
                  "naive": _arm(45, 45, forgetting=5.0)}
    assert check_targets(strategies, "replay")["all_passed"]
    strategies["joint"]["acc_std"] = 12.0  # joint's +10 over untrained is within its noise
    t = check_targets(strategies, "replay")
    assert not t["checks"]["joint_ge_untrained_plus_5_knn"]["passed"] and not t["all_passed"]


def test_parse_args_settings_methods_and_quick():
    config = parse_args(["--arms", "untrained,naive,joint", "--seeds", "2", "--scale", "0.5", "--method", "moco"])
    assert config.arms == ("untrained", "naive", "joint") and config.seeds == (0, 1) and config.method == "moco"
    assert config.steps == (40, 40, 40, 40) and config.curve_steps == 20
    default = parse_args([])
    assert default.seeds == (0, 1, 2) and default.method == "simclr" and default.default_strategy == "replay"
    assert "pixels" in default.arms and "untrained" in default.arms and "random" not in default.arms
    forgetting = parse_args(["--setting", "forgetting"])
    assert forgetting.domains == ("fashion-train", "textures") and forgetting.steps == (256, 256)
    quick = parse_args(["--quick"])
    assert quick.seeds == (0,) and quick.images_per_arm == 4 * 16 and quick.domain_limit == 200
    with pytest.raises(SystemExit):
        parse_args(["--arms", "random"])  # renamed: untrained


def test_quick_benchmark_end_to_end():
    result = benchmark(parse_args(["--quick", "--arms", "naive,replay"]))
    strategies = result["strategies"]
    assert list(strategies) == ["pixels", "untrained", "naive", "replay"]  # floors always measured
    for arm in ("naive", "replay"):
        s = strategies[arm]
        assert s["images"] == result["config"]["images_per_arm"] == 64
        assert s["minus_untrained"]["acc"] == round(s["acc"] - strategies["untrained"]["acc"], 2)
        assert set(s["minus_pixels"]["per_domain"]) == {"digits", "fashion"}
        assert [p["images"] for p in s["curve"]] == [0, 16, 32, 48, 64]
    # 53 digit probes, 5-6 per class: k = 5 - 1, chance = 6 / 53
    protocol = result["config"]["protocol"]["per_domain"]["digits"]
    assert protocol == {"k": 4, "folds": 5, "classes": 10, "scored": 53, "chance": 11.32}
    assert result["targets"]["default_arm"] == "replay" and "checks" in result["targets"]
