"""Backbones by name, starting weights, a fixed backbone per state dir, portable exports (#19)."""

import json

import pytest
import safetensors.torch
import torch
import torchvision

from deploy.errors import UsageError
from deploy.learner import (
    backbone_choice,
    build_learner,
    check_backbone,
    learner_writers,
    load_init_weights,
    load_learner_state,
)
from deploy.settings import Settings, SettingsError, load_settings
from learners.backbones import BACKBONES, build_backbone
from learners.presets import PRESETS
from learners.snapshot import backbone_spec, load_snapshot, save_backbone

# Small enough for 2 CPU cores at 32 px; resnet34/50 and convnext_tiny at their real sizes.
TINY = {
    "resnet18": {"width": 8, "small_stem": True},
    "resnet34": {"small_stem": True, "stem_stride": 2},
    "resnet50": {"small_stem": True, "stem_stride": 2},
    "convnext_tiny": {},
    "vit": {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64},
}


def _settings(tmp_path, **kw) -> Settings:
    return Settings(**{"preset": "cpu", "device": "cpu", "method": "simclr", "batch_size": 2, "resolution": 32,
                       "state_dir": tmp_path / "state", **kw})


def test_every_registered_backbone_is_covered_and_named_in_the_settings():
    assert set(TINY) == set(BACKBONES)
    description = Settings.model_fields["backbone"].description
    assert all(name in description for name in BACKBONES)
    with pytest.raises(SettingsError, match="TAILORD_BACKBONE='vgg16'"):
        load_settings(backbone="vgg16")


@pytest.mark.parametrize("name", sorted(TINY))
def test_builds_headless_with_feature_dim_and_config(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, TINY[name]).eval()
    features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, backbone.feature_dim)
    assert not any(k.startswith(("fc.", "heads.", "classifier.2.")) for k in backbone.state_dict())
    config = json.loads(json.dumps(backbone.config()))
    assert {k: config[k] for k in TINY[name]} == TINY[name]
    rebuilt = build_backbone(name, config)
    rebuilt.load_state_dict(backbone.state_dict())  # strict: same keys and shapes
    assert backbone_spec(rebuilt)["name"] == name


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_train_step_through_the_learner(tmp_path, name):
    learner = build_learner(_settings(tmp_path, backbone=name, backbone_kwargs=TINY[name]))
    described = learner.describe()["backbone"]
    assert described["name"] == name and described["class"].endswith(type(learner.backbone).__qualname__)
    assert described["kwargs"] == learner.backbone.config()
    before = {k: v.clone() for k, v in learner.backbone.state_dict().items()}
    result = learner.step(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    assert not result.skipped and torch.isfinite(torch.tensor(result.loss))
    after = learner.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the checkpoint round trip: a fresh learner of the same backbone resumes the trained weights
    for filename, write in learner_writers(learner).items():
        write(tmp_path / filename)
    torch.manual_seed(1)
    resumed = build_learner(_settings(tmp_path, backbone=name, backbone_kwargs=TINY[name]))
    load_learner_state(resumed, tmp_path)
    assert all(torch.equal(v, resumed.backbone.state_dict()[k]) for k, v in after.items())


def test_backbone_choice_defaults():
    cpu = PRESETS["cpu"]
    settings = Settings(preset="cpu")
    assert backbone_choice(settings, cpu) == ("resnet18", cpu.backbone_kwargs)
    assert backbone_choice(Settings(backbone="resnet50"), cpu) == ("resnet50", {"small_stem": True})
    assert backbone_choice(Settings(backbone="vit", backbone_kwargs={"num_layers": 2}), cpu) == \
        ("vit", {"image_size": 32, "patch_size": 4, "num_layers": 2})
    assert backbone_choice(Settings(backbone_kwargs={"width": 32}), cpu)[1]["width"] == 32


def test_bad_backbone_kwargs_or_vit_size_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="TAILORD_BACKBONE=resnet50: backbone 'resnet50'.*depth"):
        build_learner(_settings(tmp_path, backbone="resnet50", backbone_kwargs={"depth": 3}))
    with pytest.raises(UsageError, match="takes 64 px images but the resolution is 32"):
        build_learner(_settings(tmp_path, backbone="vit", backbone_kwargs={**TINY["vit"], "image_size": 64}))


# ---- starting weights

def _torchvision_resnet34_with_head() -> torch.nn.Module:
    torch.manual_seed(1)
    model = torchvision.models.resnet34(num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)  # the small stem's shape
    model.maxpool = torch.nn.Identity()
    model.train()(torch.randn(4, 3, 32, 32))  # BN running stats off their init
    return model.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pt-prefixed"])
def test_init_weights_round_trip_drops_the_head(tmp_path, fmt):
    source = _torchvision_resnet34_with_head()
    state = source.state_dict()
    assert any(k.startswith("fc.") for k in state)
    if fmt == "safetensors":
        path = tmp_path / "weights.safetensors"
        safetensors.torch.save_file(state, str(path))
    else:  # DDP-wrapped SSL method: module.backbone.* keys in a torch state dict
        path = tmp_path / "weights.pt"
        torch.save({f"module.backbone.{k}": v for k, v in state.items()}, path)
    backbone = build_backbone("resnet34", TINY["resnet34"])
    info = load_init_weights(backbone, path)
    assert info["file"] == path.name and len(info["sha256"]) == 64
    source.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.eval()(x), source(x), rtol=0, atol=0)


def test_init_weights_that_do_not_fit_name_the_keys(tmp_path):
    path = tmp_path / "r18.safetensors"
    safetensors.torch.save_file(torchvision.models.resnet18(num_classes=10).state_dict(), str(path))
    backbone = build_backbone("resnet50", TINY["resnet50"])
    with pytest.raises(UsageError) as info:
        load_init_weights(backbone, path)
    message = str(info.value)
    assert "\n" not in message and "does not fit backbone resnet50" in message
    assert "missing layer1.0.bn3.bias" in message and "shape differs" in message
    extra = tmp_path / "extra.pt"
    torch.save({**build_backbone("resnet18", TINY["resnet18"]).state_dict(), "proj.weight": torch.zeros(2)}, extra)
    with pytest.raises(UsageError, match="unexpected proj.weight"):
        load_init_weights(build_backbone("resnet18", TINY["resnet18"]), extra)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(UsageError, match="cannot read weights"):
        load_init_weights(backbone, garbage)


def test_fresh_learner_starts_from_init_weights_and_records_them(tmp_path):
    source = build_backbone("resnet18", TINY["resnet18"])
    torch.nn.init.constant_(source.conv1.weight, 0.5)
    path = tmp_path / "start.safetensors"
    safetensors.torch.save_file({f"backbone.{k}": v for k, v in source.state_dict().items()}, str(path))
    learner = build_learner(_settings(tmp_path, method="byol", backbone_kwargs=TINY["resnet18"], init_weights=path))
    assert torch.equal(learner.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(learner.method.target_backbone.conv1.weight, source.conv1.weight)  # BYOL's copy too
    recorded = learner.describe()["init_weights"]
    assert recorded["file"] == "start.safetensors" and len(recorded["sha256"]) == 64

    # Resuming ignores the file (even a missing one) and keeps the checkpoint's record.
    manifest = learner.describe()
    path.unlink()
    resumed = build_learner(_settings(tmp_path, method="byol", backbone_kwargs=TINY["resnet18"],
                                      init_weights=path), resume=manifest)
    assert resumed.describe()["init_weights"] == recorded
    assert not torch.equal(resumed.backbone.conv1.weight, source.conv1.weight)  # the checkpoint loads later


# ---- a state dir keeps its backbone

def test_changed_backbone_on_an_existing_state_dir_is_refused(tmp_path):
    manifest = build_learner(_settings(tmp_path, backbone_kwargs=TINY["resnet18"])).describe()
    check_backbone(manifest, build_backbone("resnet18", TINY["resnet18"]))  # same: fine
    with pytest.raises(UsageError) as info:
        build_learner(_settings(tmp_path, backbone="vit", backbone_kwargs=TINY["vit"]), resume=manifest)
    message = str(info.value)
    assert "\n" not in message and "trained with backbone 'resnet18'" in message and "'vit'" in message
    assert "new state dir" in message and str(tmp_path / "state") in message
    with pytest.raises(UsageError, match="'width': 8"):  # same name, other shape
        build_learner(_settings(tmp_path, backbone_kwargs={**TINY["resnet18"], "width": 16}), resume=manifest)


# ---- exports

@pytest.mark.parametrize("name", sorted(TINY))
def test_load_snapshot_of_every_backbone(tmp_path, name):
    torch.manual_seed(0)
    backbone = build_backbone(name, TINY[name]).eval()
    digest = save_backbone(backbone, tmp_path)
    manifest = {"backbone": backbone_spec(backbone), "files": {"model.safetensors": digest},
                "input": {"resolution": 32, "mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_snapshot(tmp_path)
    assert type(loaded) is type(backbone) and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), backbone(x), rtol=0, atol=0)


def test_snapshot_loads_into_plain_torchvision(tmp_path):
    """The README's example: a resnet34 snapshot in `torchvision.models.resnet34()` minus its head."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet34", {}).eval()
    save_backbone(backbone, tmp_path)
    model = torchvision.models.resnet34()
    model.fc = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), backbone(x), rtol=0, atol=0)


def _plain_torchvision(name: str, kwargs: dict) -> torch.nn.Module:
    """The torchvision model of that name, classification head replaced by identity."""
    if name == "vit":
        model = torchvision.models.VisionTransformer(**kwargs)
        model.heads = torch.nn.Identity()
    elif name == "convnext_tiny":
        model = torchvision.models.convnext_tiny()
        model.classifier[2] = torch.nn.Identity()
    else:
        model = getattr(torchvision.models, name)()
        model.fc = torch.nn.Identity()
    return model


@pytest.mark.parametrize("name,kwargs", [("resnet18", {"width": 64}), ("resnet50", {}), ("convnext_tiny", {}),
                                         ("vit", TINY["vit"])])
def test_every_backbones_snapshot_loads_into_plain_torchvision(tmp_path, name, kwargs):
    """Torchvision-shaped configs (ImageNet stem, full width) of the other backbones load the same way."""
    torch.manual_seed(0)
    backbone = build_backbone(name, kwargs).eval()
    save_backbone(backbone, tmp_path)
    model = _plain_torchvision(name, kwargs)
    model.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 32 if name == "vit" else 64, 32 if name == "vit" else 64)
    torch.testing.assert_close(model.eval()(x), backbone(x), rtol=0, atol=0)
