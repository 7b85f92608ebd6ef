"""ReservoirBuffer: uniform inclusion (chi-square), limits, persistence that resumes exactly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from replay.buffer import META_FILE, TENSORS_FILE, ReservoirBuffer


def _batch(start: int, n: int, size: int = 4, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    g = torch.Generator().manual_seed(seed + start)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return [f"s{i}" for i in range(start, start + n)], images


def test_inclusion_is_uniform_over_the_stream():
    n_items, capacity, trials, batch = 10_000, 100, 300, 2_000
    ids = [str(i) for i in range(n_items)]
    images = torch.zeros((batch, 3, 1, 1), dtype=torch.uint8)
    domains = ["d"] * batch
    counts = np.zeros(n_items)
    for trial in range(trials):
        buf = ReservoirBuffer(max_images=capacity, max_bytes=1 << 30, seed=trial)
        for start in range(0, n_items, batch):
            buf.add(ids[start : start + batch], images, domains)
        assert len(buf) == capacity and buf.seen == n_items
        counts[[int(s) for s in buf.sample_ids]] += 1
    expected = trials * capacity / n_items
    per_item = ((counts - expected) ** 2 / expected).sum()
    assert chi2.sf(per_item, n_items - 1) > 0.001
    # 100 position buckets: far more power against any drift towards early/late items
    buckets = counts.reshape(100, -1).sum(axis=1)
    expected_bucket = trials * capacity / 100
    per_bucket = ((buckets - expected_bucket) ** 2 / expected_bucket).sum()
    assert chi2.sf(per_bucket, 99) > 0.001


def test_capacity_is_bounded_by_bytes_and_images():
    per_image = 3 * 8 * 8
    buf = ReservoirBuffer(max_images=100, max_bytes=per_image * 10 + 50, seed=0)
    ids, images = _batch(0, 50, size=8)
    buf.add(ids, images, ["d"] * 50)
    assert buf.capacity == 10 and len(buf) == 10
    assert buf.nbytes == 10 * per_image <= buf.max_bytes
    small = ReservoirBuffer(max_images=7, max_bytes=1 << 20)
    small.add(ids, images, ["d"] * 50)
    assert len(small) == 7


def test_sample_is_without_replacement_and_returns_kept_images():
    buf = ReservoirBuffer(max_images=20, max_bytes=1 << 20, seed=1)
    assert buf.sample(4) is None
    ids, images = _batch(0, 20)
    buf.add(ids, images, ["d"] * 20)
    drawn = buf.sample(8)
    assert drawn.shape == (8, 3, 4, 4) and drawn.dtype == torch.uint8
    rows = {tuple(img.flatten().tolist()) for img in drawn}
    assert len(rows) == 8
    assert rows <= {tuple(img.flatten().tolist()) for img in images}
    assert buf.sample(100).shape[0] == 20


def test_rejects_bad_batches():
    buf = ReservoirBuffer(max_images=10, max_bytes=1 << 20)
    ids, images = _batch(0, 3)
    with pytest.raises(ValueError):
        buf.add(ids, images.float(), ["d"] * 3)
    with pytest.raises(ValueError):
        buf.add(ids[:2], images, ["d"] * 3)
    buf.add(ids, images, ["d"] * 3)
    with pytest.raises(ValueError):
        buf.add(*_batch(3, 3, size=5), ["d"] * 3)


def test_save_load_continues_identically(tmp_path):
    original = ReservoirBuffer(max_images=50, max_bytes=1 << 20, seed=3)
    ids, images = _batch(0, 300)
    original.add(ids, images, [f"d{i % 3}" for i in range(300)])
    original.sample(5)  # advance the RNG past its seed
    original.save(tmp_path)
    assert (tmp_path / TENSORS_FILE).exists() and (tmp_path / META_FILE).exists()

    restored = ReservoirBuffer(max_images=50, max_bytes=1 << 20, seed=999)
    restored.load(tmp_path)
    for buf in (original, restored):
        more_ids, more = _batch(300, 400)
        buf.add(more_ids, more, ["d"] * 400)
    (t1, m1), (t2, m2) = original.state_dict(), restored.state_dict()
    assert m1 == m2
    assert torch.equal(t1["images"], t2["images"])
    assert torch.equal(original.sample(10), restored.sample(10))


def test_load_rejects_a_torn_pair(tmp_path):
    buf = ReservoirBuffer(max_images=10, max_bytes=1 << 20)
    buf.add(*_batch(0, 10), ["d"] * 10)
    buf.save(tmp_path)
    other = ReservoirBuffer(max_images=10, max_bytes=1 << 20, seed=5)
    other.add(*_batch(100, 10), ["d"] * 10)
    json_bytes = (tmp_path / META_FILE).read_bytes()
    other.save(tmp_path)
    (tmp_path / META_FILE).write_bytes(json_bytes)  # crash between the two renames
    with pytest.raises(ValueError):
        ReservoirBuffer(max_images=10, max_bytes=1 << 20).load(tmp_path)


def test_domains_travel_with_images():
    buf = ReservoirBuffer(max_images=1000, max_bytes=1 << 20)
    ids, images = _batch(0, 30)
    buf.add(ids, images, ["a"] * 10 + ["b"] * 20)
    _, meta = buf.state_dict()
    assert Counter(meta["reservoirs"][0]["domains"]) == {"a": 10, "b": 20}
