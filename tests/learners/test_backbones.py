import json

import pytest
import torch
import torchvision

from learners.backbones import ResNet18, build_backbone


def test_width64_imagenet_stem_matches_torchvision_resnet18():
    ours = ResNet18()
    ref = torchvision.models.resnet18(num_classes=10)
    ref_params = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in ours.parameters()) == ref_params
    # Same names and shapes: torchvision weights (minus fc) load strictly and give the same features.
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}
    ours.load_state_dict(ref_state, strict=True)
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))
    assert ours.feature_dim == 512


@pytest.mark.parametrize("width,stride", [(4, 1), (8, 2)])
def test_small_stem_shapes(width, stride):
    m = ResNet18(width=width, small_stem=True, stem_stride=stride)
    assert m.feature_dim == 8 * width
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (stride, stride)
    assert isinstance(m.maxpool, torch.nn.Identity)
    assert m.layer4[0].conv1.out_channels == 8 * width
    assert m(torch.randn(3, 3, 16, 16)).shape == (3, 8 * width)


def test_config_is_json_and_rebuilds_same_shapes():
    m = ResNet18(width=8, small_stem=True, stem_stride=2)
    cfg = json.loads(json.dumps(m.config()))
    assert cfg == {"width": 8, "small_stem": True, "stem_stride": 2}
    rebuilt = build_backbone("resnet18", cfg)
    rebuilt.load_state_dict(m.state_dict())  # strict: same keys and shapes


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", {})
    with pytest.raises(ValueError, match="small stem"):
        ResNet18(small_stem=False, stem_stride=2)
    with pytest.raises(ValueError):
        ResNet18(width=0)
