"""Bring your own backbone end to end (#19): the real daemon with a tiny ViT (`TAILORD_BACKBONE=vit`)
trains two experiences from the broker and exports a snapshot over HTTP; the snapshot is the chosen
checkpoint's ViT and loads both with `learners.load_snapshot` and into plain torchvision.

Kept small (one 32-d transformer layer, 48 images per domain, in-process producer and snapshot
client) so it costs seconds, not minutes."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from deploy.indexer import backbone_from_checkpoint
from deploy.snapshot_client import request_snapshot
from learners.snapshot import load_snapshot
from streamer.produce import produce
from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.test_snapshot_e2e import write_targets
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e]

TINY_VIT = {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


def test_vit_daemon_trains_two_experiences_and_exports_a_snapshot(broker, tmp_path):
    topic = unique_topic("vit")
    for source, count in (("digits", 48), ("fashion", 48), ("textures", 8)):  # textures ends fashion's
        assert produce(f"builtin:{source}", topic, broker.bootstrap, limit=count, batch=8, progress=False) == count
    targets = tmp_path / "targets"
    write_targets(targets / "fashion-task", "fashion", 100, 8)
    state = tmp_path / "state"
    daemon = DaemonProcess(state, broker.bootstrap, topic, backbone="vit", backbone_kwargs=json.dumps(TINY_VIT),
                           batch_size=16, probe_fraction=0.1, experience_images=100_000,
                           targets_dir=targets).start()
    try:
        daemon.wait_for(lambda: (daemon.status().get("encoder_version") or 0) >= 2, 120,
                        "two experiences trained and indexed")
        out = tmp_path / "out"
        summary = request_snapshot(targets / "fashion-task", None, out, "route", None, None,
                                   daemon.url, daemon.token, None)
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    records = json.loads((state / "metrics" / "history.json").read_text())["records"]
    assert [(r["experience"], r["domain"]) for r in records[:2]] == [(1, "digits"), (2, "fashion")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["mode"] == "online" and manifest["chosen_experience"] in (1, 2)
    assert manifest["backbone"]["name"] == "vit"
    kwargs = manifest["backbone"]["kwargs"]
    assert kwargs == {"image_size": 32, **TINY_VIT}
    reference, _ = backbone_from_checkpoint(state / "checkpoints" / f"exp-{manifest['chosen_experience']:06d}", "cpu")
    plain = torchvision.models.VisionTransformer(**kwargs)
    plain.heads = torch.nn.Identity()
    plain.load_state_dict(load_file(str(out / "model.safetensors")))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(images)  # (4, 32)
        assert expected.shape == (4, 32)
        assert torch.allclose(load_snapshot(out)(images), expected, atol=1e-5)
        assert torch.allclose(plain.eval()(images), expected, atol=1e-5)
