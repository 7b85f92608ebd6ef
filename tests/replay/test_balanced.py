"""BalancedBuffer: equal shares per key, uniform down-sampling, even sampling, persistence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from replay.balanced import BalancedBuffer

DOMAINS = ["a", "b", "c"]


def _images(values: list[int], size: int = 2) -> torch.Tensor:
    """Images filled with one value each, so a sampled image tells its domain."""
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, size, size)


def _stream(buf: BalancedBuffer, counts: dict[str, int], batch: int = 50, seed: int = 0) -> None:
    """Interleave domains in random order, each image's pixels = its domain's index."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([[d] * n for d, n in counts.items()])
    rng.shuffle(order)
    serial = Counter()
    for start in range(0, len(order), batch):
        domains = order[start : start + batch].tolist()
        ids = []
        for d in domains:
            ids.append(f"{d}{serial[d]}")
            serial[d] += 1
        buf.add(ids, _images([DOMAINS.index(d) for d in domains]), domains)


def _kept(buf: BalancedBuffer) -> Counter:
    return Counter(sid[0] for sid in buf.sample_ids)


def test_shares_are_equal_across_three_domains():
    buf = BalancedBuffer(max_images=90, max_bytes=1 << 20, seed=0)
    _stream(buf, {"a": 3000, "b": 300})
    assert _kept(buf) == {"a": 45, "b": 45}
    _stream(buf, {"a": 500, "c": 200}, seed=1)  # a third key re-splits the capacity
    assert _kept(buf) == {"a": 30, "b": 30, "c": 30}
    assert len(buf) == 90 and buf.seen == 4000


def test_down_sampled_key_stays_a_uniform_sample_of_its_stream():
    positions = []
    for seed in range(40):
        buf = BalancedBuffer(max_images=60, max_bytes=1 << 20, seed=seed)
        ids = [f"a{i}" for i in range(1000)]
        buf.add(ids, _images([0] * 1000), ["a"] * 1000)
        buf.add(["b0", "c0"], _images([1, 2]), ["b", "c"])
        positions += [int(s[1:]) for s in buf.sample_ids if s[0] == "a"]
    # 40 x 20 kept positions of a uniform draw from 0..999: mean ~ 499.5, sd of the mean ~ 10
    assert len(positions) == 40 * 20
    assert abs(np.mean(positions) - 499.5) < 45


def test_sample_draws_evenly_across_keys():
    buf = BalancedBuffer(max_images=90, max_bytes=1 << 20, seed=2)
    _stream(buf, {"a": 1000, "b": 200, "c": 100})
    drawn = buf.sample(30)
    assert Counter(drawn[:, 0, 0, 0].tolist()) == {0: 10, 1: 10, 2: 10}
    assert buf.sample(1000).shape[0] == 90
    assert BalancedBuffer(10, 1 << 20).sample(3) is None


def test_short_key_gives_what_it_has():
    buf = BalancedBuffer(max_images=90, max_bytes=1 << 20, seed=3)
    _stream(buf, {"a": 500, "b": 500, "c": 5})
    assert _kept(buf) == {"a": 30, "b": 30, "c": 5}
    values = Counter(buf.sample(45)[:, 0, 0, 0].tolist())
    assert values[2] == 5 and values[0] + values[1] == 40 and abs(values[0] - values[1]) <= 1


def test_caller_keys_override_domains_and_bytes_bound_holds():
    per_image = 3 * 2 * 2
    buf = BalancedBuffer(max_images=1000, max_bytes=per_image * 20, seed=4)
    n = 400
    ids = [f"x{i}" for i in range(n)]
    buf.add(ids, _images([0] * n), ["one-domain"] * n, keys=[str(i % 4) for i in range(n)])
    assert buf.capacity == 20 and len(buf) == 20 and buf.nbytes <= buf.max_bytes
    assert sorted(buf.shares().values()) == [5, 5, 5, 5]
    assert Counter(int(s[1:]) % 4 for s in buf.sample_ids) == {0: 5, 1: 5, 2: 5, 3: 5}


def test_save_load_continues_identically(tmp_path):
    original = BalancedBuffer(max_images=30, max_bytes=1 << 20, seed=5)
    _stream(original, {"a": 200, "b": 100})
    original.save(tmp_path)
    restored = BalancedBuffer(max_images=30, max_bytes=1 << 20, seed=77)
    restored.load(tmp_path)
    for buf in (original, restored):
        _stream(buf, {"b": 50, "c": 80}, seed=9)
    assert original.state_dict()[1] == restored.state_dict()[1]
    assert torch.equal(original.sample(12), restored.sample(12))
