"""Snapshots run beside training: SEPT and routing never touch the global RNG, and their memory is bounded."""

from __future__ import annotations

import hashlib

import pytest
import torch

import deploy.snapshots as snapshots
from deploy.http_api import error_status
from deploy.snapshot_errors import SnapshotError
from deploy.snapshots import SnapshotEngine
from tests.snapshot_testkit import RES, build_state, target_images


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return build_state(tmp_path_factory.mktemp("state"), {1: "red", 2: "blue"})


@pytest.fixture
def engine(state):
    engine = SnapshotEngine.open_offline(state, "cpu")
    yield engine
    engine.close()


def model_digest(engine: SnapshotEngine, name: str) -> str:
    return hashlib.sha256(engine.file_path(name, "model.safetensors").read_bytes()).hexdigest()


def test_a_snapshot_never_reads_advances_or_reseeds_the_global_rng(engine) -> None:
    """The training thread's augmentation stream is the global RNG: an HTTP snapshot must leave it alone."""
    targets = target_images("blue", 4) + target_images("red", 4)
    labels = {name: name.split("-")[0] for name, _ in targets}  # labels: the top candidates are loaded too
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    manifest = engine.create(targets, labels, strategy="route+sept", budget=8, epochs=1, name="isolated")
    assert manifest["sept_steps"] > 0 and manifest["labels_used"]
    assert torch.equal(torch.random.get_rng_state(), before)


def test_sept_is_repeatable_whatever_the_global_seed(engine) -> None:
    digests = []
    for seed, name in ((1, "seed-1"), (2, "seed-2")):
        torch.manual_seed(seed)
        engine.create(target_images("blue", 3), strategy="sept", budget=8, epochs=1, name=name)
        digests.append(model_digest(engine, name))
    assert digests[0] == digests[1]


PER_IMAGE = 2 * 3 * RES * RES  # decoded uint8 pixels, counted twice (one by one, then stacked)


def test_targets_over_the_memory_ceiling_are_refused_before_decoding(engine, monkeypatch) -> None:
    engine.max_bytes = 20 * PER_IMAGE

    def no_decode(*_args, **_kwargs):
        raise AssertionError("decoded before the ceiling check")

    monkeypatch.setattr(snapshots, "decode_image", no_decode)
    with pytest.raises(SnapshotError) as err:
        engine.create(target_images("blue", 21), strategy="route", name="too-many")
    assert error_status(err.value) == 400 and "memory ceiling" in err.value.message and "at most 20" in err.value.message
    with pytest.raises(SnapshotError) as err:
        engine.create(target_images("blue", 3), strategy="sept", budget=18, name="too-big-budget")
    assert error_status(err.value) == 400 and "at most 17" in err.value.message


def test_the_budget_fits_the_ceiling(engine) -> None:
    engine.max_bytes = 20 * PER_IMAGE
    assert engine._fit_budget(3, 17, 10_000, sept=True) == 17
    assert engine._fit_budget(3, None, 10_000, sept=True) == 17  # the default (64+) shrinks to fit
    assert engine._fit_budget(3, 5000, 10_000, sept=False) == 5000  # route reads no samples
    with pytest.raises(SnapshotError):
        engine._fit_budget(19, None, 10_000, sept=True)  # room for one sample: too few to train on
    engine.max_bytes = snapshots.SNAPSHOT_MAX_BYTES
    assert engine._fit_budget(3, None, 1_000_000, sept=True) == snapshots.BUDGET_MIN


def test_the_default_budget_is_a_share_of_the_store_and_of_the_targets() -> None:
    assert snapshots.default_budget(200, 960) == 64  # 5 % of the store is 48: the floor
    assert snapshots.default_budget(200, 9_000) == 67  # a third of the targets, not 450
    assert snapshots.default_budget(3_000, 9_000) == 450  # 5 % of the store, not 1,000
    assert snapshots.default_budget(9_000, 1_000_000) == snapshots.BUDGET_MAX


def test_the_default_ceiling_admits_the_default_budget_at_224_px(engine) -> None:
    engine.decode_size = 224
    assert engine._fit_budget(5_000, None, 1_000_000, sept=True) == snapshots.default_budget(5_000, 1_000_000)
