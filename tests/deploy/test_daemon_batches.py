"""The daemon's batch preparation (on the prefetch thread) and the stand-in batch of an idle rank."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from deploy.batches import Prepared, replay_count, split_probes, standin, stream_batch_size
from deploy.probes import hashed_probe
from streamer.records import Sample


def sample(i: int, probe: bool = False) -> Sample:
    image = torch.full((3, 8, 8), i, dtype=torch.uint8)
    return Sample(f"d/{i}", image, b"x", "d", None, probe, 0, i)


def test_prepared_splits_probes_and_stacks_the_trained_images_in_order():
    samples = [sample(i, probe=(i == 3)) for i in range(40)]
    prepared = Prepared.of(samples, 0.2, pin=False)
    train, held_out = split_probes(samples, 0.2)
    assert prepared.train == train and prepared.held_out == held_out
    assert samples[3] in held_out
    assert all(hashed_probe(s.sample_id, 0.2) or s.probe for s in held_out)
    assert 0 < len(held_out) < len(samples)
    assert torch.equal(prepared.images, torch.stack([s.image for s in train]))


def test_prepared_without_trainable_images_has_none():
    prepared = Prepared.of([sample(3, probe=True)], 0.0, pin=False)
    assert prepared.images is None and len(prepared.held_out) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (page-locked memory)")
def test_prepared_images_are_pinned_for_the_gpu_copy():
    assert Prepared.of([sample(1), sample(2)], 0.0, pin=True).images.is_pinned()


def test_standin_is_the_last_batch_or_two_blank_images():
    assert standin(deque(), 8).shape == (2, 3, 8, 8)
    last = torch.ones(5, 3, 8, 8, dtype=torch.uint8)
    assert standin(deque([torch.zeros(1), last]), 8) is last


def test_replay_share_splits_the_batch():
    assert stream_batch_size(64, 0.25) == 48
    assert replay_count(48, 0.25) == 16
