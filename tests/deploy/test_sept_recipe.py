"""SEPT continues with the daemon's effective recipe: TAILORD_LR / TAILORD_BATCH_SIZE are recorded
in every checkpoint manifest and read back by the snapshot engine (#14)."""

from __future__ import annotations

import pytest

import deploy.sept_child as sept_child
from deploy.learner import build_learner, trained_preset
from deploy.settings import Settings
from deploy.snapshots import SnapshotEngine
from learners.presets import PRESETS
from tests.snapshot_testkit import build_state, target_images


def test_the_manifest_records_the_effective_lr_and_batch_size():
    learner = build_learner(Settings(preset="cpu", device="cpu", method="simclr", resolution=16, lr=0.123,
                                     batch_size=10))
    assert learner.describe()["training"] == {"lr": 0.123, "batch_size": 10}
    assert trained_preset(learner.describe()) == learner.preset


def test_a_manifest_without_the_recipe_gets_its_named_presets():
    assert trained_preset({"preset": "cpu"}) == PRESETS["cpu"]
    chosen = trained_preset({"preset": "cpu", "training": {"lr": 0.5, "batch_size": 7}})
    assert (chosen.lr, chosen.batch_size, chosen.resolution) == (0.5, 7, PRESETS["cpu"].resolution)
    assert trained_preset({"preset": "cpu", "input": {"resolution": 24}}).resolution == 24


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return build_state(tmp_path_factory.mktemp("state"), {1: "red", 2: "blue"})


def test_sept_trains_with_the_checkpoints_recipe(state, monkeypatch):
    recipe = {"lr": 0.0123, "batch_size": 3}
    read = sept_child.read_checkpoint
    monkeypatch.setattr(sept_child, "read_checkpoint", lambda path: (lambda s, m: (s, {**m, "training": recipe}))(
        *read(path)))
    seen = {}
    step = sept_child.sept_step
    monkeypatch.setattr(sept_child, "sept_step", lambda method, preset, *a, **k: (
        seen.setdefault("lr", preset.lr), step(method, preset, *a, **k))[1])
    train = sept_child.continue_pretraining
    monkeypatch.setattr(sept_child, "continue_pretraining", lambda step, images, batch_size, *a, **k: (
        seen.setdefault("batch_size", batch_size), train(step, images, batch_size, *a, **k))[1])
    engine = SnapshotEngine.open_offline(state, "cpu")
    try:
        engine.create(target_images("blue", 3), strategy="sept", budget=8, epochs=1, name="recipe")
    finally:
        engine.close()
    assert seen == {"lr": 0.0123, "batch_size": 3}  # sept_step then scales the lr by SEPT_LR_SCALE
