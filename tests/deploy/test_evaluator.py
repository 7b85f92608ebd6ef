"""deploy/evaluator: experience ends scored on a thread, within a budget, in order, never lost."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from deploy.evaluate import FrozenModel, evaluate_row, score_baselines
from deploy.evaluator import KIND, MAX_PENDING, EvaluationJob, Evaluator, requeue
from deploy.index_budget import ComputeBudget
from deploy.learner import build_learner
from deploy.metrics import Metrics
from deploy.probes import ProbeSet
from deploy.settings import Settings

SIZE = 16


@pytest.fixture(scope="module")
def learner():
    return build_learner(Settings(preset="cpu", device="cpu", method="simclr", resolution=SIZE, batch_size=8,
                                  seed=0, torch_threads=1))


def probes(experience: int, per_class: int = 10) -> ProbeSet:
    """Two classes of noise images, some mislabelled so that scores are not all 1."""
    kept = ProbeSet(experience, 1000)
    generator = torch.Generator().manual_seed(experience)
    for i in range(2 * per_class):
        image = torch.randint(0, 120, (3, SIZE, SIZE), generator=generator, dtype=torch.uint8) + 100 * (i % 2)
        kept.add(f"s{experience}-{i}", image.to(torch.uint8), str((i % 2) if i > 3 else 1 - i % 2), "d")
    return kept


def job(learner, experience: int) -> EvaluationJob:
    sets = {j: probes(j) for j in range(1, experience + 1)}
    return EvaluationJob(experience, FrozenModel.of(learner), sets, {"domain": "d"})


def closed_budget() -> ComputeBudget:
    """A budget that never allows: training has run for 0 s, so no share is earned."""
    budget = ComputeBudget(0.05, kinds=(KIND,))
    budget.trained(0.0)
    return budget


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_row_scored_off_the_loop_equals_the_row_scored_on_it(learner, tmp_path):
    metrics = Metrics()
    evaluator = Evaluator(tmp_path, ComputeBudget(None, kinds=(KIND,)), metrics)
    evaluator.start()
    queued = job(learner, 2)
    evaluator.submit(queued)
    assert evaluator.flush(timeout=60)
    (done,) = evaluator.finished()
    expected = evaluate_row(learner, queued.probe_sets, 2, tmp_path / "inline")
    assert (done.experience, done.row.accuracy, done.row.linear) == (2, expected.accuracy, expected.linear)
    assert done.row.probe_loss == pytest.approx(expected.probe_loss)
    assert done.baselines == score_baselines(learner, queued.probe_sets[2], tmp_path)
    assert done.record == {"domain": "d"} and done.seconds > 0
    assert evaluator.budget.seconds[KIND] > 0 and metrics.evaluation_seconds._value.get() > 0
    assert metrics.evaluations_pending._value.get() == 0 and evaluator.finished() == []
    evaluator.stop()


def test_the_budget_holds_a_lone_row_and_a_second_one_lifts_it(learner, tmp_path):
    evaluator = Evaluator(tmp_path, closed_budget())
    evaluator.start()
    evaluator.submit(job(learner, 1))
    time.sleep(1.0)
    assert evaluator.pending == 1 and evaluator.finished() == []  # out of budget: waits
    evaluator.submit(job(learner, 2))  # a row may lag by one experience, not two
    wait_for(lambda: evaluator.pending == 1)
    (first,) = evaluator.finished()
    assert first.experience == 1
    time.sleep(0.5)
    assert evaluator.pending == 1  # alone again: the budget binds again
    assert evaluator.flush(timeout=60)
    assert [done.experience for done in evaluator.finished()] == [2]
    evaluator.stop()


def test_resting_lifts_the_budget(learner, tmp_path):
    budget = closed_budget()
    evaluator = Evaluator(tmp_path, budget)
    evaluator.start()
    evaluator.submit(job(learner, 1))
    budget.rest()  # no input: the cores are free
    wait_for(lambda: evaluator.pending == 0)
    assert budget.used_share == 0.0  # counted, not charged
    evaluator.stop()


def test_wait_below_blocks_the_loop_until_a_row_is_done(learner, tmp_path):
    evaluator = Evaluator(tmp_path, closed_budget())
    evaluator.start()
    for experience in range(1, MAX_PENDING + 1):
        evaluator.submit(job(learner, 1) if experience == 1 else job(learner, experience))
    evaluator.wait_below(MAX_PENDING)
    assert evaluator.pending < MAX_PENDING
    evaluator.stop()


def test_stop_abandons_the_row_under_way_and_a_failure_gives_a_row_of_none(learner, tmp_path):
    evaluator = Evaluator(tmp_path, closed_budget())
    evaluator.start()
    evaluator.submit(job(learner, 1))
    time.sleep(0.3)
    evaluator.stop()
    assert evaluator.pending == 1 and evaluator.finished() == []  # still pending: the checkpoint keeps it

    broken = Evaluator(tmp_path, ComputeBudget(None, kinds=(KIND,)))
    broken.start()
    bad = job(learner, 2)
    bad.probe_sets[1].images[0] = torch.zeros(3, SIZE + 1, SIZE + 1, dtype=torch.uint8)  # cannot be stacked
    broken.submit(bad)
    assert broken.flush(timeout=60)
    (done,) = broken.finished()
    assert done.row.accuracy == [None, None] and done.row.linear == [None, None] and done.baselines == {}
    broken.stop()


def test_requeue_scores_a_pending_row_with_its_experience_checkpoint(learner, tmp_path):
    trained = FrozenModel.of(learner).method
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.mul_(0.5)
    folder = tmp_path / "checkpoints" / "exp-000002"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(folder / "model.safetensors"))
    evaluator = Evaluator(tmp_path, ComputeBudget(None, kinds=(KIND,)))
    sets = {1: probes(1), 2: probes(2), 3: probes(3)}
    pending = [{"experience": 2, "record": {"domain": "b"}}, {"experience": 3, "record": {"domain": "c"}}]
    lost = requeue(evaluator, learner, tmp_path / "checkpoints", pending, sets)
    assert lost == [3]  # exp-000003 was never written
    queued = evaluator._jobs[0]
    assert queued.experience == 2 and sorted(queued.probe_sets) == [1, 2] and queued.record == {"domain": "b"}
    for mine, theirs in zip(queued.model.method.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    evaluator.start()
    assert evaluator.flush(timeout=60)
    assert [done.experience for done in evaluator.finished()] == [2]
    evaluator.stop()
