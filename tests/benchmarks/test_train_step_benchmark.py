"""benchmarks/train_step.py times the backbone the daemon would train (#19): the preset's by
default, `--backbone NAME` with its defaults for the preset's resolution, never the environment's."""

from __future__ import annotations

from benchmarks.train_step import backbone_spec
from learners.backbones import build_backbone
from learners.presets import PRESETS


def test_backbone_spec_is_the_daemons_choice_for_the_flags_not_the_environment(monkeypatch):
    monkeypatch.setenv("TAILORD_BACKBONE", "convnext_tiny")  # a daemon setting; the benchmark's flags choose
    assert backbone_spec(PRESETS["cpu"], None, {}) == ("resnet18", {"small_stem": True, "width": 16, "stem_stride": 1})
    assert backbone_spec(PRESETS["cpu"], "resnet50", {}) == ("resnet50", {"small_stem": True})
    assert backbone_spec(PRESETS["cpu"], "vit", {"num_layers": 1}) == (
        "vit", {"image_size": 32, "patch_size": 4, "num_layers": 1})
    assert backbone_spec(PRESETS["gpu"], "vit", {}) == ("vit", {"image_size": 224, "patch_size": 16})


def test_gpu_preset_is_the_papers_resnet50_at_224_px():
    name, kwargs = backbone_spec(PRESETS["gpu"], None, {})
    assert (name, PRESETS["gpu"].resolution, PRESETS["gpu"].batch_size) == ("resnet50", 224, 256)
    backbone = build_backbone(name, kwargs)
    assert backbone.feature_dim == 2048 and backbone.conv1.kernel_size == (7, 7)  # the ImageNet stem
