"""Smoke test of benchmarks/continual.py at toy scale: stream, arms, summaries, targets."""

import torch

from benchmarks.continual import (
    Config,
    Domain,
    arrival_orders,
    check_targets,
    load_domain,
    parse_args,
    run_arm,
    summarize,
)


def _domain(name: str, seed: int, n_train: int = 40, n_probe: int = 15) -> Domain:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train + n_probe, 3, 32, 32), dtype=torch.uint8, generator=g)
    return Domain(name, images[:n_train], images[n_train:], [str(i % 3) for i in range(n_probe)])


def test_load_domain_holds_out_a_stratified_deterministic_probe_set():
    domain = load_domain("digits", resolution=32, probe_images=30, limit=120)
    again = load_domain("digits", resolution=32, probe_images=30, limit=120)
    assert domain.train.shape[1:] == (3, 32, 32) and domain.train.dtype == torch.uint8
    assert len(domain.probe) >= 30 and len(domain.train) + len(domain.probe) == 120
    assert len(set(domain.probe_labels)) == 10  # every class is represented
    assert torch.equal(domain.probe, again.probe) and domain.probe_labels == again.probe_labels


def test_arrival_orders_cycle_through_each_domain():
    domains = [_domain("a", 0, n_train=10), _domain("b", 1, n_train=40)]
    small, large = arrival_orders(domains, count=25, seed=0)
    assert len(small) == len(large) == 25
    assert sorted(small[:10].tolist()) == list(range(10))  # a full pass before any repeat
    assert len(set(large.tolist())) == 25


def test_every_arm_gets_the_same_compute_and_a_summary():
    domains = [_domain("a", 0), _domain("b", 1)]
    config = Config(domains=("a", "b"), seeds=(0,), steps_per_experience=2, batch_size=8,
                    replay_max_images=16)
    images_per_arm = config.steps * config.batch_size * len(domains)
    strategies = {}
    for arm in ("random", "random_bn", "naive", "replay+distill", "ewc", "joint"):
        run = run_arm(arm, domains, config, seed=0)
        if arm.startswith("random"):
            assert run.images == 0 and len(run.rows) == 1
        else:
            assert run.images == images_per_arm
        if arm in ("naive", "replay+distill", "ewc"):
            assert [len(row) for row in run.rows] == [1, 2]  # lower-triangular R
        strategies[arm] = summarize([run], domains)
    assert all(0 <= s["acc"] <= 100 for s in strategies.values())
    assert strategies["joint"]["avg_forgetting"] is None and strategies["naive"]["avg_forgetting"] >= 0
    assert set(strategies["naive"]["per_domain"]) == {"a", "b"}
    targets = check_targets(strategies)
    assert targets["best_continual"] in ("replay+distill", "ewc")
    assert isinstance(targets["best_within_1_of_joint"], bool)


def test_parse_args_scales_steps():
    config = parse_args(["--arms", "random,naive,joint", "--seeds", "2", "--scale", "0.5"])
    assert config.arms == ("random", "naive", "joint") and config.seeds == (0, 1)
    assert config.steps == round(config.steps_per_experience * 0.5)
