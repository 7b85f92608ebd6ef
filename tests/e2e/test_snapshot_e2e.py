"""Snapshots end to end: a running daemon on two domains, `tailord snapshot` over HTTP for a
target from one domain -> the manifest routes to that domain's experience, and the exported
weights (loaded both ways) reproduce that checkpoint encoder's features."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from deploy.indexer import backbone_from_checkpoint
from learners.augment import EvalTransform
from learners.backbones import ResNet18
from learners.evaluation import embed
from learners.snapshot import load_snapshot
from streamer.decode import decode_record
from streamer.limits import DecodeLimits
from streamer.sources import open_source
from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.streams import produce
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def write_targets(folder, source: str, skip: int, count: int) -> list[bytes]:
    """Images of a builtin source not among the first `skip` (those were streamed)."""
    folder.mkdir(parents=True)
    items = []
    for i, item in enumerate(open_source(f"builtin:{source}").items):
        if i < skip:
            continue
        (folder / f"{item.key}.{item.fmt_ext}").write_bytes(item.encoded)
        items.append(item.encoded)
        if len(items) == count:
            return items
    return items


INDEXES = {"flat": {}, "ivf-ondisk": {"index_exact_max": 100, "index_ondisk": True}}


@pytest.mark.parametrize("index", INDEXES)
def test_route_snapshot_over_http(broker, tmp_path, index):
    topic = unique_topic("snap")
    produce(broker.bootstrap, topic, "builtin:digits", 160, batch=8)
    produce(broker.bootstrap, topic, "builtin:fashion", 160, batch=8)
    produce(broker.bootstrap, topic, "builtin:textures", 16, batch=8)  # ends the fashion experience
    targets_dir = tmp_path / "targets"
    target_bytes = write_targets(targets_dir / "fashion-task", "fashion", 400, 40)
    state = tmp_path / "state"
    daemon = DaemonProcess(state, broker.bootstrap, topic, experience_images=100_000, batch_size=32,
                           probe_fraction=0.1, targets_dir=targets_dir, torch_threads=2, **INDEXES[index]).start()
    try:
        daemon.wait_for(lambda: (daemon.status().get("encoder_version") or 0) >= 2, 300,
                        "two experiences indexed")
        # the step keeps its threads beside the indexer's FAISS calls (it ran on one before, replay/faiss_threads.py)
        assert daemon.status()["torch_threads"] == 2
        # no token / wrong token -> 401; a path outside the targets dir -> 400
        assert daemon.get("/admin/status")[0] == 401
        assert daemon.get("/admin/status", token="wrong")[0] == 401
        req = urllib.request.Request(daemon.url + "/admin/snapshots", method="POST",
                                     data=json.dumps({"target_path": "/etc"}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {daemon.token}"})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("a target outside TAILORD_TARGETS_DIR was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400

        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-m", "deploy.cli", "snapshot", "--target",
                               str(targets_dir / "fashion-task"), "--out", str(out), "--strategy", "route",
                               "--url", daemon.url, "--token", daemon.token],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        manifest = json.loads((out / "manifest.json").read_text())
        chosen = manifest["chosen_experience"]
        ckpt = state / "checkpoints" / f"exp-{chosen:06d}"
        domains = json.loads((state / "metrics" / "history.json").read_text())["records"]
        assert {r["experience"]: r["domain"] for r in domains}[chosen] == "fashion"
        assert result["chosen_experience"] == chosen
        assert daemon.stop(signal.SIGTERM) == 0
        published = list((state / "index").glob("v*/index.ivfdata"))
        assert bool(published) == (index == "ivf-ondisk")  # the lists were served from disk
    finally:
        daemon.kill()

    images = torch.stack([decode_record(b, [], DecodeLimits(), 32)[0].image for b in target_bytes])
    reference, _ = backbone_from_checkpoint(ckpt, "cpu")
    transform = EvalTransform(32)
    expected = embed(reference, images, transform)
    loaded = load_snapshot(out)
    plain = ResNet18(**manifest["backbone"]["kwargs"])
    plain.load_state_dict(load_file(str(out / "model.safetensors")))
    assert torch.allclose(embed(loaded, images, transform), expected, atol=1e-5)
    assert torch.allclose(embed(plain, images, transform), expected, atol=1e-5)
