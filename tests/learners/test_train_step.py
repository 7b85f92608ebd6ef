import dataclasses

import pytest
import torch
from torch import nn

from learners.augment import BatchAugment
from learners.backbones import ResNet18
from learners.methods import build_method
from learners.presets import PRESETS
from learners.train_step import StepResult, TrainStep, build_optimizer, ssl_loss

CPU = torch.device("cpu")


def _method(name: str = "simsiam") -> nn.Module:
    torch.manual_seed(0)
    return build_method(name, ResNet18(width=8, small_stem=True))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=g)


def _step(method, regularizer=None, preset=PRESETS["cpu"], **kw) -> TrainStep:
    extra = regularizer.parameters() if regularizer is not None else ()
    opt = build_optimizer(method, preset, extra_params=extra)
    return TrainStep(method, BatchAugment(16), opt, CPU, amp=False, channels_last=kw.pop("channels_last", False),
                     regularizer=regularizer, **kw)


class RecordingRegularizer:
    """Regularizer stub: a fixed penalty on the backbone, records hook calls."""

    def __init__(self, value: float = 0.1) -> None:
        self.value = value
        self.calls: list[str] = []
        self.extra = nn.Parameter(torch.ones(3))

    def parameters(self):
        return [self.extra]

    def penalty(self, backbone, views, features):
        self.calls.append("penalty")
        self.seen_shapes = (tuple(views.shape), tuple(features.shape))
        return self.value + 0 * backbone.conv1.weight.sum() + 0 * self.extra.sum()

    def after_backward(self, backbone):
        self.calls.append("after_backward")
        self.grad_seen = backbone.conv1.weight.grad is not None

    def after_step(self, backbone):
        self.calls.append("after_step")


def test_step_updates_weights_and_reports():
    method = _method()
    step = _step(method)
    before = method.backbone.conv1.weight.detach().clone()
    result = step(_images(6), replay_u8=_images(4, seed=1))
    assert isinstance(result, StepResult)
    assert result.images == 10 and not result.skipped and result.penalty == 0.0
    assert torch.isfinite(torch.tensor(result.loss)) and result.seconds > 0
    assert not torch.allclose(before, method.backbone.conv1.weight)


def test_hooks_run_in_order_with_views_and_features():
    method = _method("byol")
    reg = RecordingRegularizer(0.25)
    order: list[str] = []
    method.after_step = lambda: order.append("method.after_step")
    step = _step(method, regularizer=reg)
    reg.calls = order
    result = step(_images(6))
    assert order == ["penalty", "after_backward", "after_step", "method.after_step"]
    assert reg.grad_seen
    assert reg.seen_shapes == ((6, 3, 16, 16), (6, 64))
    assert result.penalty == pytest.approx(0.25)
    assert any(p is reg.extra for g in step.optimizer.param_groups for p in g["params"])


def test_non_finite_loss_skips_update():
    method = _method()
    reg = RecordingRegularizer(float("nan"))
    step = _step(method, regularizer=reg)
    params_before = [p.detach().clone() for p in method.parameters()]
    result = step(_images(6))
    assert result.skipped
    assert reg.calls == ["penalty"]  # no backward/step hooks
    assert all(torch.equal(a, p) for a, p in zip(params_before, method.parameters(), strict=True))
    assert all(p.grad is None for p in method.parameters())
    assert not step.optimizer.state  # no momentum buffers created


def test_grad_clip_bounds_the_update():
    method = _method()
    preset = dataclasses.replace(PRESETS["cpu"], weight_decay=0.0)
    step = _step(method, preset=preset, grad_clip=1e-6)
    params = [p for p in method.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    step(_images(6))
    lr = preset.lr * preset.batch_size / 256
    delta = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(params, before, strict=True)))
    assert 0 < delta <= lr * 1e-6 * 1.01


def test_channels_last_converts_model_and_still_trains_the_optimizer_params():
    method = _method()
    step = _step(method, channels_last=True)
    w = method.backbone.conv1.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert any(p is w for g in step.optimizer.param_groups for p in g["params"])
    before = w.detach().clone()
    step(_images(6))
    assert not torch.allclose(before, w)


def test_build_optimizer_scaling_and_parameter_selection():
    method = _method("byol")
    sgd = build_optimizer(method, PRESETS["cpu"])
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["lr"] == pytest.approx(PRESETS["cpu"].lr * PRESETS["cpu"].batch_size / 256)
    assert sgd.param_groups[0]["momentum"] == 0.9
    params = {id(p) for p in sgd.param_groups[0]["params"]}
    assert not any(id(p) in params for p in method.target_backbone.parameters())
    assert all(id(p) in params for p in method.backbone.parameters())
    adamw = build_optimizer(method, dataclasses.replace(PRESETS["cpu"], optimizer="adamw", lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(method, dataclasses.replace(PRESETS["cpu"], optimizer="lamb"))


def test_ssl_loss_keeps_graph_and_is_reproducible_with_generator():
    method = _method().eval()
    aug = BatchAugment(16)
    x = _images(6)
    loss = ssl_loss(method, aug, x, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and loss.requires_grad
    again = ssl_loss(method, aug, x, generator=torch.Generator().manual_seed(0))
    assert loss.item() == again.item()
    assert all(p.grad is None for p in method.parameters())  # no backward, no step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_with_bf16_autocast_and_channels_last():
    device = torch.device("cuda")
    method = _method("byol")
    opt = build_optimizer(method, PRESETS["cpu"])
    step = TrainStep(method, BatchAugment(16), opt, device, amp=True, channels_last=True)
    assert method.backbone.conv1.weight.is_cuda
    before = method.backbone.conv1.weight.detach().clone()
    result = step(_images(6), replay_u8=_images(2, seed=1))
    assert not result.skipped and result.images == 8
    assert not torch.allclose(before, method.backbone.conv1.weight)
    # Augmentation on the GPU stays per-image random and reproducible with a CUDA generator.
    x = _images(1).repeat(4, 1, 1, 1).cuda()
    a = step.augment(x, generator=torch.Generator(device).manual_seed(0))
    b = step.augment(x, generator=torch.Generator(device).manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.is_cuda and (a[0] - a[1]).abs().max() > 0


def test_weight_scales_the_gradients():
    grads = []
    for weight in (1.0, 2.5):
        method = _method()
        step = _step(method)
        torch.manual_seed(3)
        step(_images(8), weight=weight)
        grads.append(method.backbone.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[1], 2.5 * grads[0], rtol=1e-4, atol=1e-6)


class FakeGroup:
    """A data-parallel group stub: what the other ranks answer, and which grads were reduced."""

    def __init__(self, others_finite: bool) -> None:
        self.others_finite = others_finite
        self.reduced: list[nn.Parameter] = []

    def all_true(self, flag: bool) -> bool:
        return flag and self.others_finite

    def all_reduce_grads(self, params):
        self.reduced = list(params)


def test_group_skips_together_and_reduces_only_parameters_outside_the_method():
    method = _method()
    reg = RecordingRegularizer()
    group = FakeGroup(others_finite=False)
    step = _step(method, regularizer=reg, group=group)
    before = method.backbone.conv1.weight.detach().clone()
    assert step(_images(8)).skipped  # finite here, but another rank was not: nobody steps
    assert torch.equal(before, method.backbone.conv1.weight)

    group.others_finite = True
    assert not step(_images(8)).skipped
    assert [id(p) for p in group.reduced] == [id(reg.extra)]
