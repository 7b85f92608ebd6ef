"""MoCo v2 (`learners.methods.moco`): queue, momentum encoder, loss, checkpoints, DDP, learner."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from learners.backbones import ResNet18
from learners.methods.moco import MoCo

DEADLINE_S = 120  # the 2-rank run; a hung collective fails the test instead of blocking
SHARES = (3, 5)  # images of rank 0 and rank 1 in the DDP step


class _FeatureStub(nn.Identity):
    """A backbone of a given feature_dim that returns its input (for queue-only tests)."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim


def _moco(seed: int = 0, **kwargs) -> MoCo:
    torch.manual_seed(seed)
    return MoCo(ResNet18(width=4, small_stem=True), **kwargs)


def _views(b: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    return x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)


def _keys(n: int, start: int) -> torch.Tensor:
    """(n, 2) keys whose first column numbers them: start, start + 1, ..."""
    return torch.stack([torch.arange(start, start + n).float(), torch.zeros(n)], dim=1)


def test_enqueue_is_fifo_and_wraps_around():
    method = MoCo(_FeatureStub(4), proj_dim=2, queue_size=5)
    method.enqueue(_keys(3, start=0))
    assert method.queue[:3, 0].tolist() == [0, 1, 2] and method.queue_ptr.item() == 3
    method.enqueue(_keys(4, start=3))  # 3 4 | wraps: 5 6 overwrite the oldest, 0 1
    assert method.queue[:, 0].tolist() == [5, 6, 2, 3, 4] and method.queue_ptr.item() == 2
    method.enqueue(_keys(7, start=7))  # more than K: rows 2 3 4 0 1 2 3 get 7..13, so 9..13 stay
    assert method.queue[:, 0].tolist() == [10, 11, 12, 13, 9] and method.queue_ptr.item() == 4
    assert method.queue.shape == (5, 2)


def test_after_step_enqueues_both_views_keys_and_forward_alone_does_not():
    method = _moco(queue_size=64)
    v1, v2 = _views(b=4)
    before = method.queue.clone()
    with torch.no_grad():
        expected = torch.cat([method._keys(v1), method._keys(v2)])  # (8, P), key encoder unchanged
        method(v1, v2)
        method.eval()
        method(v1, v2)  # a probe loss: no after_step follows, the queue must stay as it was
    assert torch.equal(method.queue, before) and method.queue_ptr.item() == 0
    method.train()
    method(v1, v2)
    method.after_step()
    assert method.queue_ptr.item() == 8
    torch.testing.assert_close(method.queue[:8], expected)
    assert torch.equal(method.queue[8:], before[8:])
    method.after_step()  # a second call has nothing left to enqueue
    assert method.queue_ptr.item() == 8


def test_key_encoder_gets_no_grads_and_follows_query_encoder_by_ema():
    method = _moco(momentum=0.9, queue_size=64)
    key = [*method.key_backbone.parameters(), *method.key_projector.parameters()]
    query = [*method.backbone.parameters(), *method.projector.parameters()]
    assert key and all(not p.requires_grad for p in key)
    method(*_views()).loss.backward()
    assert all(p.grad is None for p in key)
    assert all(p.grad is not None for p in query)

    before = [p.detach().clone() for p in key]
    with torch.no_grad():
        for p in query:
            p.add_(torch.randn_like(p))  # as if the optimizer moved the query encoder
    method.after_step()
    for k, b, q in zip(key, before, query, strict=True):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q)
    assert not torch.allclose(key[0], query[0])


def test_features_are_the_query_backbones_view1_features():
    method = _moco(queue_size=64)
    v1, v2 = _views()
    out = method(v1, v2)
    assert out.features.shape == (8, 32) and method.projector[-1].out_features == 32
    torch.testing.assert_close(out.features, method.backbone(v1))


def test_loss_is_finite_and_decreases_over_a_few_steps():
    """4 batches of 8 random images in turn; a 32-key queue holds only the other 2 batches'
    keys (no copies of the batch itself). The first cycle is skipped: its negatives are
    the random initial queue, which is easy until real keys replace it."""
    method = _moco(queue_size=32, momentum=0.9)
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 8, 3, 16, 16, generator=g)  # (batches, B, 3, H, W)
    losses = []
    for step in range(24):
        x = images[step % 4]
        loss = method(x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step()
        losses.append(loss.item())
    second_cycle, last_cycle = sum(losses[4:8]) / 4, sum(losses[-4:]) / 4
    assert last_cycle < 0.5 * second_cycle, losses


def test_checkpoint_round_trip_restores_queue_pointer_and_key_encoder(tmp_path):
    method = _moco(queue_size=20)
    for seed in range(3):  # 3 steps of 2 * 8 keys: the pointer has wrapped (48 % 20 = 8)
        method(*_views(seed=seed)).loss.backward()
        method.after_step()
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in method.state_dict().items()}, str(path))

    restored = _moco(seed=1, queue_size=20)
    assert not torch.equal(restored.queue, method.queue)
    restored.load_state_dict(load_file(str(path)))
    assert restored.queue_ptr.item() == method.queue_ptr.item() == 8
    for name, tensor in method.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert {"queue", "queue_ptr"} <= set(load_file(str(path)))


def test_learner_with_moco_steps_with_a_regularizer_and_checkpoints(tmp_path):
    from deploy.learner import build_learner, learner_writers, load_learner_state
    from deploy.settings import Settings

    settings = Settings(preset="cpu", device="cpu", method="moco", strategy="replay+ewc",
                        resolution=16, batch_size=4, seed=0)
    learner = build_learner(settings)
    assert isinstance(learner.method, MoCo) and learner.describe()["method"] == "moco"
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    result = learner.step(images, images[:2])  # 4 stream + 2 replay images
    assert not result.skipped and result.images == 6
    assert learner.method.queue_ptr.item() == 12  # both views' keys of all 6 images

    queue = learner.method.queue.clone()
    views = torch.randn(2, 4, 3, 16, 16)  # EWC's Fisher runs the method outside a train step
    learner.regularizer.on_experience_end(
        learner.backbone, lambda v: learner.method(v[:2], v[2:]).loss, list(views))
    assert torch.equal(learner.method.queue, queue) and learner.method.queue_ptr.item() == 12
    assert not learner.step(images).skipped  # the penalty now anchors method.backbone

    for name, write in learner_writers(learner).items():
        write(tmp_path / name)
    fresh = build_learner(settings.model_copy(update={"seed": 1}))
    load_learner_state(fresh, tmp_path)
    assert torch.equal(fresh.method.queue, learner.method.queue)
    assert fresh.method.queue_ptr.item() == learner.method.queue_ptr.item() == 20


# ---- two gloo ranks with unequal batches ----

def _rank_step(rank: int, port: int, out: Path) -> None:
    """One DDP MoCo step on this rank's share; saves its queue and its own keys."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        method = _moco(seed=rank, queue_size=64)  # DDP starts both ranks from rank 0's state
        ddp = nn.parallel.DistributedDataParallel(method)
        v1, v2 = _views(b=sum(SHARES), seed=3)
        lo = sum(SHARES[:rank])
        v1, v2 = v1[lo:lo + SHARES[rank]], v2[lo:lo + SHARES[rank]]
        with torch.no_grad():
            own = torch.cat([method._keys(v1), method._keys(v2)])  # (2 B_r, P)
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
        ddp(v1, v2, data_parallel=True).loss.backward()
        optimizer.step()
        method.after_step()
        result = {"queue": method.queue.clone(), "ptr": method.queue_ptr.item(), "own": own}
    except Exception:
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, out / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_with_unequal_batches_enqueue_every_ranks_keys(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_step, args=(rank, port, tmp_path)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(DEADLINE_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    res = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, r in enumerate(res):
        assert "error" not in r, f"rank {rank}:\n{r.get('error')}"
    assert torch.equal(res[0]["queue"], res[1]["queue"])
    n0, n1 = 2 * SHARES[0], 2 * SHARES[1]
    assert res[0]["ptr"] == res[1]["ptr"] == n0 + n1
    torch.testing.assert_close(res[0]["queue"][:n0], res[0]["own"])  # rank order: rank 0 first
    torch.testing.assert_close(res[0]["queue"][n0:n0 + n1], res[1]["own"])
