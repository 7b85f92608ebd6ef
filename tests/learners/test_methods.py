import pytest
import torch
from torch import nn

from learners.backbones import ResNet18
from learners.methods import MethodOutput, build_method
from learners.methods.byol import BYOL
from learners.methods.simclr import SimCLR
from learners.methods.simsiam import SimSiam


def _backbone() -> ResNet18:
    return ResNet18(width=4, small_stem=True)


def _views(b: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randn(b, 3, 16, 16, generator=g)


class _FeatureStub(nn.Identity):
    """Stands in for a backbone of a given feature_dim (to check head sizes cheaply)."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim


@pytest.mark.parametrize("name", ["simsiam", "byol", "simclr", "moco"])
def test_output_finite_features_are_view1_backbone_features_and_grads_reach_backbone(name):
    torch.manual_seed(0)
    method = build_method(name, _backbone())
    v1, v2 = _views()
    out = method(v1, v2)
    assert isinstance(out, MethodOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.features.shape == (8, 32)
    torch.testing.assert_close(out.features, method.backbone(v1))
    out.loss.backward()
    grad = method.backbone.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_build_method_unknown_name():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("dino", _backbone())


def test_head_sizes_scale_with_feature_dim():
    small, full = SimSiam(_FeatureStub(128)), SimSiam(_FeatureStub(512))
    assert small.projector[-2].out_features == 512 and small.predictor[0].out_features == 128
    assert full.projector[-2].out_features == 2048 and full.predictor[0].out_features == 512
    byol = BYOL(_FeatureStub(512))
    assert byol.projector[0].out_features == 4096 and byol.projector[-1].out_features == 256
    assert SimCLR(_FeatureStub(512)).projector[-1].out_features == 128


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_simsiam_stops_gradient_through_target_branch():
    torch.manual_seed(0)
    method = SimSiam(_backbone(), proj_dim=16, pred_dim=8)
    v1, v2 = _views()
    method(v1, v2).loss.backward()
    got = _grads(method.backbone)

    def reference(stop_grad: bool) -> list[torch.Tensor]:
        method.zero_grad()
        sg = (lambda t: t.detach()) if stop_grad else (lambda t: t)
        z1, z2 = method.projector(method.backbone(v1)), method.projector(method.backbone(v2))
        p1, p2 = method.predictor(z1), method.predictor(z2)
        crit = method.criterion
        (0.5 * (crit(p1, sg(z2)) + crit(p2, sg(z1)))).backward()
        return _grads(method.backbone)

    for a, b in zip(got, reference(stop_grad=True), strict=True):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(got, reference(stop_grad=False), strict=True))


def test_byol_target_gets_no_grads_and_follows_online_by_ema():
    torch.manual_seed(0)
    method = BYOL(_backbone(), hidden_dim=16, proj_dim=8, momentum=0.9)
    target = list(method.target_backbone.parameters()) + list(method.target_projector.parameters())
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    assert all(not p.requires_grad for p in target)
    method(*_views()).loss.backward()
    assert all(p.grad is None for p in target)

    before = [t.detach().clone() for t in target]
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))  # as if the optimizer moved the online network
    method.after_step()
    for t, b, o in zip(target, before, online, strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    assert not torch.allclose(target[0], online[0])


def test_simclr_loss_lower_for_identical_views_than_random():
    torch.manual_seed(0)
    method = SimCLR(_backbone(), proj_dim=16, temperature=0.5)
    v1, v2 = _views(b=16)
    with torch.no_grad():
        same, different = method(v1, v1).loss, method(v1, v2).loss
    assert same < different - 0.5
