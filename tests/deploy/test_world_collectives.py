"""`deploy.world.World` in a real 2-rank gloo group on the CPU (no torchrun, no daemon).

One spawn of two processes runs every scenario (imports dominate the time); each rank
joins through `World.from_env`, as under torchrun, and saves its results to a file that
the tests below check, partly against a single-process run made here.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import time
import traceback
from collections import deque
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import deploy.world
from deploy.world import Tick, World, agree
from learners.augment import BatchAugment
from learners.backbones import ResNet18
from learners.methods import build_method
from learners.presets import PRESETS
from learners.train_step import TrainStep, build_optimizer

CPU = torch.device("cpu")
SIZE = 2
DEADLINE_S = 150  # the whole 2-rank run; a hung collective fails the tests instead of blocking
SHARES = [(3, 5), (6, 2)]  # images of rank 0 and rank 1 in each DDP step


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _batch(step: int) -> torch.Tensor:
    """The 8 images of DDP step `step`, all ranks together."""
    return _images(sum(SHARES[step]), seed=10 + step)


class MirrorViews(nn.Module):
    """Deterministic per-image augmentation: the images, then their mirror images.

    `BatchAugment` draws per-image randomness from a per-process RNG, so ranks holding
    different shares would see other views than one process holding the whole batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.calls += 1
        x = images.float() / 255 - 0.5
        return x.flip(-1) if self.calls % 2 == 0 else x


def _without_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm -> GroupNorm(1, C): per-image normalization, so a batch split across ranks
    computes what the whole batch does (DDP BatchNorm uses each rank's own statistics)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features, affine=child.affine))
        else:
            _without_batchnorm(child)
    return module


def _ddp_ready_step(seed: int, group: World | None, method_name: str) -> TrainStep:
    """`method_name` on a tiny ResNet-18 without BatchNorm, the preset's SGD (momentum, weight decay)."""
    torch.manual_seed(seed)
    method = _without_batchnorm(build_method(method_name, ResNet18(width=8, small_stem=True)))
    optimizer = build_optimizer(method, PRESETS["cpu"])
    return TrainStep(method, MirrorViews(), optimizer, CPU, amp=False, channels_last=True, group=group)


def _params(method: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.named_parameters()}


class Poison:
    """Regularizer stub whose penalty is NaN while `on`."""

    def __init__(self) -> None:
        self.on = False

    def penalty(self, backbone, views, features):
        return features.new_full((), float("nan") if self.on else 0.0)

    def after_backward(self, backbone) -> None:
        pass

    def after_step(self, backbone) -> None:
        pass


# ---- scenarios: run in each rank, return what the tests check ----

def _collectives(world: World) -> dict:
    rank = world.rank
    ticks = world.exchange(Tick(records=rank + 1, images=2 * rank, domain=f"d{rank}", lag={rank: 10 + rank}))
    gathered = world.gather({"rank": rank, "ids": list(range(rank + 2))})
    broadcast = world.broadcast({"from": rank, "t": torch.arange(3) * (rank + 1)})
    all_true = [world.all_true(True), world.all_true(rank == 0), world.all_true(False)]
    averaged = world.average_state({"f": torch.full((2,), float(rank + 1)), "n": torch.tensor([rank])})
    extra = nn.Parameter(torch.zeros(2))
    if rank == 0:
        extra.grad = torch.tensor([2.0, 4.0])  # rank 1 has no grad: it counts as zeros
    world.all_reduce_grads([extra])
    world.barrier()
    return {"ticks": ticks, "gathered": gathered, "broadcast": broadcast, "all_true": all_true,
            "averaged": averaged, "grad": extra.grad.clone()}


def _ddp_steps(world: World, method_name: str) -> dict:
    step = _ddp_ready_step(seed=world.rank, group=world, method_name=method_name)  # DDP starts from rank 0's
    step.forward = world.wrap(step.method, CPU)
    start = _params(step.method)
    weights, skipped = [], []
    for i, shares in enumerate(SHARES):
        lo = sum(shares[: world.rank])
        mine = _batch(i)[lo : lo + shares[world.rank]]
        agreed = agree(world.exchange(Tick(records=1, images=len(mine), stepped=len(mine))), None)
        weights.append(agreed.weight(world.rank, world.size))
        skipped.append(step(mine, weight=weights[-1]).skipped)
    return {"start": start, "end": _params(step.method), "weights": weights, "skipped": skipped}


def _skip_together(world: World) -> dict:
    """The daemon's own model (BatchNorm) and augmentation; rank 1's loss turns NaN once."""
    torch.manual_seed(world.rank)
    method = build_method("simsiam", ResNet18(width=8, small_stem=True))
    poison = Poison()
    step = TrainStep(method, BatchAugment(16), build_optimizer(method, PRESETS["cpu"]), CPU, amp=False,
                     channels_last=True, regularizer=poison, group=world)
    step.forward = world.wrap(method, CPU)
    start = _params(method)
    poison.on = world.rank == 1
    first = step(_images(4, seed=20 + world.rank, size=20))
    after_skip = _params(method)
    poison.on = False
    second = step(_images(4, seed=30 + world.rank, size=20))
    return {"start": start, "after_skip": after_skip, "end": _params(method),
            "skipped": [first.skipped, second.skipped], "loss": first.loss + first.penalty}


def _regularizer_average(world: World) -> dict:
    """`update_regularizer` (EWC, then MAS with no data on rank 1) vs each rank's own estimate."""
    from deploy.batches import standin
    from deploy.learner import build_learner, paired_views, paired_views_loss, update_regularizer
    from deploy.settings import Settings
    from learners.regularizers import build_regularizer

    settings = Settings(preset="cpu", device="cpu", method="simsiam", strategy="ewc", resolution=16, seed=0)
    learner = build_learner(settings, world)
    out = {}
    for name in ("ewc", "mas"):
        recent = deque(_images(4, seed=40 + 10 * world.rank + k) for k in range(2))
        if name == "mas":
            learner.regularizer = build_regularizer("mas")
            if world.rank == 1:
                recent.clear()  # a rank that saw no data: the blank stand-in
        torch.manual_seed(7)  # the same augmentations for the own estimate and the real call
        own = build_regularizer(name)
        batches = list(recent) or [standin(recent, learner.preset.resolution)]
        own.on_experience_end(learner.backbone, paired_views_loss(learner), paired_views(learner, batches))
        torch.manual_seed(7)
        update_regularizer(learner, recent, world)
        out[name] = {"own": own.state_dict(), "averaged": learner.regularizer.state_dict()}
    return out


SCENARIOS = {"collectives": _collectives, "skip": _skip_together,
             "ddp_simsiam": lambda world: _ddp_steps(world, "simsiam"),
             # SimCLR compares each anchor with every rank's embeddings (gathered negatives)
             "ddp_simclr": lambda world: _ddp_steps(world, "simclr"),
             "regularizer": _regularizer_average}


def _worker(rank: int, port: int, out: Path) -> None:
    """One rank: join through `World.from_env` as under torchrun, run the scenarios, save results."""
    for key in [k for k in os.environ if k.startswith("TAILORD_")]:
        del os.environ[key]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deploy.world.COLLECTIVE_TIMEOUT = timedelta(seconds=30)  # a mismatch errors instead of waiting 30 min
    world = World.from_env("cpu")
    results: dict = {"rank": world.rank, "size": world.size}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(world)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                break  # the other rank's next collective fails fast once this group is gone
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        world.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' results (rank order)."""
    out = tmp_path_factory.mktemp("world")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, out)) for rank in range(SIZE)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"ranks still running after {DEADLINE_S} s (a collective hung)"
    assert [p.exitcode for p in procs] == [0] * SIZE
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(SIZE)]


def _result(ranks: list[dict], name: str) -> list[dict]:
    found = [r.get(name, {"error": "not reached (an earlier scenario failed)"}) for r in ranks]
    for rank, r in enumerate(found):
        if "error" in r:
            pytest.fail(f"rank {rank}, scenario {name}:\n{r['error']}")
    return found


def test_object_collectives_round_trip(ranks):
    assert [(r["rank"], r["size"]) for r in ranks] == [(0, 2), (1, 2)]
    res = _result(ranks, "collectives")
    expected_ticks = [Tick(records=1, images=0, domain="d0", lag={0: 10}),
                      Tick(records=2, images=2, domain="d1", lag={1: 11})]
    assert res[0]["ticks"] == res[1]["ticks"] == expected_ticks
    assert res[0]["gathered"] == [{"rank": 0, "ids": [0, 1]}, {"rank": 1, "ids": [0, 1, 2]}]
    assert res[1]["gathered"] is None
    for r in res:
        assert r["broadcast"]["from"] == 0 and torch.equal(r["broadcast"]["t"], torch.arange(3))
        assert r["all_true"] == [True, False, False]
        assert torch.equal(r["averaged"]["f"], torch.full((2,), 1.5))
        assert torch.equal(r["grad"], torch.tensor([1.0, 2.0]))
    assert [r["averaged"]["n"].item() for r in res] == [0, 1]  # integer tensors are left alone


@pytest.mark.parametrize("method_name", ["simsiam", "simclr"])
def test_ddp_step_on_unequal_shares_equals_one_step_on_the_whole_batch(ranks, method_name):
    res = _result(ranks, f"ddp_{method_name}")
    assert res[0]["weights"] == pytest.approx([0.75, 1.5]) and res[1]["weights"] == pytest.approx([1.25, 0.5])
    assert not any(res[0]["skipped"] + res[1]["skipped"])
    reference = _ddp_ready_step(seed=0, group=None, method_name=method_name)
    start = _params(reference.method)
    for i in range(len(SHARES)):
        assert not reference(_batch(i)).skipped
    end = _params(reference.method)
    for name in start:
        assert torch.equal(res[0]["start"][name], start[name]), name  # rank 1 took rank 0's weights
        assert torch.equal(res[0]["end"][name], res[1]["end"][name]), name
        # The update, not the weights: a wrong gradient mean changes it by far more than rounding.
        torch.testing.assert_close(res[0]["end"][name] - start[name], end[name] - start[name],
                                   rtol=1e-4, atol=5e-7, msg=lambda m, n=name: f"{n}: {m}")
    moved = sum((end[n] - start[n]).abs().sum() for n in start)
    assert moved > 0


def test_non_finite_loss_on_one_rank_skips_the_step_on_both(ranks):
    res = _result(ranks, "skip")
    assert [r["skipped"] for r in res] == [[True, False], [True, False]]
    assert math.isfinite(res[0]["loss"]) and math.isnan(res[1]["loss"])  # only rank 1 was not finite
    for name, start in res[0]["start"].items():
        for r in res:
            assert torch.equal(r["start"][name], start), name
            assert torch.equal(r["after_skip"][name], start), name  # skipped everywhere
        assert torch.equal(res[0]["end"][name], res[1]["end"][name]), name  # DDP still in step
    assert any(not torch.equal(res[0]["end"][n], s) for n, s in res[0]["start"].items())


def test_update_regularizer_averages_the_ranks_statistics(ranks):
    res = _result(ranks, "regularizer")
    for name in ("ewc", "mas"):
        own = [r[name]["own"] for r in res]
        averaged = [r[name]["averaged"] for r in res]
        assert set(averaged[0]) == set(own[0]) and any(k.startswith("importance.") for k in own[0])
        differs = [k for k in own[0] if not torch.allclose(own[0][k], own[1][k])]
        assert differs and all(k.startswith("importance.") for k in differs), name
        for key in own[0]:
            assert torch.equal(averaged[0][key], averaged[1][key]), (name, key)
            torch.testing.assert_close(averaged[0][key], (own[0][key] + own[1][key]) / 2,
                                       rtol=1e-6, atol=0, msg=lambda m, k=f"{name} {key}": f"{k}: {m}")
