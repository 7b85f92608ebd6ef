"""The daemon's boundary decision (deploy/boundaries.py) and header-less producing."""

import pytest
import torch

from deploy.boundaries import Boundaries, experience_record, label
from deploy.learner import build_learner
from deploy.metrics import Metrics
from deploy.progress import Progress
from deploy.settings import Settings, load_settings
from deploy.world import Tick, World, agree
from streamer.produce import record_value, sample_headers
from streamer.sources import Item


def test_header_wins_then_drift_then_count():
    boundaries = Boundaries(load_settings(boundary="header,drift", experience_images=100), Metrics())
    progress = Progress(images_in_experience=10, domain="digits")
    both = agree([Tick(records=1, images=4, domain="fashion", changed_to="fashion", drift=9.0)], "digits")
    assert boundaries.before_step(both, progress) == ("header", None, "fashion")
    drift = agree([Tick(records=1, images=4, domain="digits", drift=9.0)], "digits")
    assert boundaries.before_step(drift, progress) == ("drift", 9.0, None)
    assert boundaries.after_step(progress) is None
    progress.images_in_experience = 100
    assert boundaries.after_step(progress) == ("count", None, None)


def test_drift_only_ignores_headers_and_keeps_the_domain():
    boundaries = Boundaries(load_settings(boundary="drift"), Metrics())
    progress = Progress(images_in_experience=10, domain="default")
    agreed = agree([Tick(records=1, images=4, domain="x", changed_to="x")], "default")
    assert boundaries.before_step(agreed, progress) is None
    boundaries.pending = 7.5
    boundaries.ended("drift", 7.5, progress)
    assert boundaries.pending is None
    assert b'tailord_experience_boundaries_total{reason="drift"} 1.0' in boundaries.metrics.render()


def test_automatic_name_and_span():
    progress = Progress(experience=7, domain="default", positions={0: 900, 1: 40},
                        first_offsets={0: 100, 1: 40}, started_at=5.0)
    assert label(progress) == "exp-7"
    assert label(Progress(domain="photos")) == "photos"
    record = experience_record(progress, "drift", 8.25)
    assert record == {"name": "exp-7", "boundary": "drift", "drift_statistic": 8.25,
                      "offsets": {"0": [100, 899]}, "started_at": 5.0}
    assert Progress.from_json(progress.to_json()) == progress


def test_no_domain_headers():
    item = Item(key="7", encoded=b"x", fmt_ext="png", label="3")
    assert sample_headers(item, "digits", False, with_domain=False) == {"sample-id": "digits/7", "label": "3"}
    _, headers = record_value([(item, {})], None, as_tar=True)
    assert "domain" not in headers


@pytest.fixture(scope="module")
def learner():
    return build_learner(Settings(preset="cpu", device="cpu", seed=0, torch_threads=1), World())


def drift_boundaries(**settings) -> Boundaries:
    return Boundaries(Settings(preset="cpu", device="cpu", boundary="drift", **settings), Metrics())


def test_the_detector_embeds_a_shrunk_share_of_the_step(learner):
    boundaries = drift_boundaries()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    boundaries.observe(learner, images, stream_images=64)
    kept = boundaries.detector.recent_inputs
    assert kept.shape == (48, 3, 8, 8) and kept.dtype == torch.uint8  # 3/4 of the step at a quarter of the side
    assert boundaries.detector.recent.shape == (48, learner.backbone.feature_dim)
    assert boundaries.detector.images_in_experience == 64


def test_the_detector_side_can_be_set(learner):
    boundaries = drift_boundaries(drift_resolution=32, drift_sample=0.25)
    boundaries.observe(learner, torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), stream_images=64)
    assert boundaries.detector.recent_inputs.shape == (16, 3, 32, 32)


def test_a_checkpoint_kept_at_another_side_resumes(learner):
    boundaries = drift_boundaries()
    boundaries.detector.recent_inputs = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)  # an older release's state
    boundaries.detector.recent = torch.zeros(10, learner.backbone.feature_dim)
    boundaries.detector.past_inputs = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    boundaries.detector.past = torch.zeros(20, learner.backbone.feature_dim)
    boundaries.observe(learner, torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), stream_images=64)
    assert boundaries.detector.recent_inputs.shape == (58, 3, 8, 8)
    assert boundaries.detector.past_inputs.shape[-1] == 8
