import copy
import hashlib
import json

import pytest
import safetensors.torch
import torch

from learners.augment import IMAGENET_MEAN, IMAGENET_STD
from learners.backbones import ResNet18
from learners.snapshot import backbone_spec, load_snapshot, save_backbone


def _write_snapshot(tmp_path, backbone, sha=None):
    digest = save_backbone(backbone, tmp_path)
    manifest = {
        "backbone": backbone_spec(backbone),
        "input": {"resolution": 16, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "files": {"model.safetensors": sha or digest},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return digest


def _trained_backbone() -> ResNet18:
    torch.manual_seed(0)
    backbone = ResNet18(width=4, small_stem=True, stem_stride=2)
    backbone.train()(torch.randn(8, 3, 16, 16))  # move BN running stats off their init
    return backbone.eval()


def test_round_trip_gives_identical_features(tmp_path):
    backbone = _trained_backbone()
    # Saved from the channels_last layout used in training (non-contiguous weights).
    training_layout = copy.deepcopy(backbone).to(memory_format=torch.channels_last)
    digest = _write_snapshot(tmp_path, training_layout)
    assert digest == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp*"))

    loaded = load_snapshot(tmp_path)
    assert isinstance(loaded, ResNet18) and not loaded.training
    assert loaded.config() == backbone.config()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(loaded(x), backbone(x), rtol=0, atol=0)


def test_plain_load_state_dict_works_without_tailord_helpers(tmp_path):
    backbone = _trained_backbone()
    _write_snapshot(tmp_path, backbone)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backbone"]["class"] == "learners.backbones.ResNet18"
    plain = ResNet18(**manifest["backbone"]["kwargs"])
    plain.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain.eval()(x), backbone(x), rtol=0, atol=0)


def test_bad_sha_is_rejected(tmp_path):
    _write_snapshot(tmp_path, _trained_backbone(), sha="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        load_snapshot(tmp_path)


def test_unknown_or_mismatched_backbone_is_rejected(tmp_path):
    _write_snapshot(tmp_path, _trained_backbone())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["backbone"]["class"] = "os.system"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match"):
        load_snapshot(tmp_path)
    manifest["backbone"]["name"] = "vgg16"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unknown backbone"):
        load_snapshot(tmp_path)
