"""The daemon loop's pieces without a broker or a subprocess: the run state's bookkeeping, the
checkpoint policy and contents, the experience end, and what a rank says in its tick."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import deploy.daemon as daemon
from deploy.batches import Prepared
from deploy.boundaries import Boundaries
from deploy.checkpoints import load_latest
from deploy.daemon import (
    Batch,
    Checkpointer,
    RunState,
    checkpoint_name,
    domain_change,
    end_experience,
    exit_checkpoint,
    next_batch,
    tick,
)
from deploy.history import History
from deploy.learner import build_buffer, build_learner
from deploy.metrics import Metrics, Throughput
from deploy.probes import ProbeSet
from deploy.progress import Progress
from deploy.settings import Settings
from deploy.world import Agreement, Tick, World
from learners.train_step import StepResult
from streamer.records import Sample


def run_state(**progress: object) -> RunState:
    return RunState(Progress(**progress), History(), ProbeSet(1, 10), {})


def agreement(**fields: object) -> Agreement:
    values = {"records": 1, "images": 1, "stepped": 1, "per_rank": [1], "domain": None, "boundary_to": None,
              "stop": False, "idle": False, "checkpoint_due": False, "lag": {}}
    return Agreement(**{**values, **fields})


def sample(i: int, domain: str = "d") -> Sample:
    return Sample(f"{domain}/{i}", torch.full((3, 8, 8), i, dtype=torch.uint8), b"x", domain, None, False, 0, i)


class Recorder:
    """Stands in for a collaborator: records calls, answers with `returns`."""

    def __init__(self, returns: object = None) -> None:
        self.calls: list[tuple] = []
        self.returns = returns

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls.append(args)
        return self.returns


# ---- the run state


def test_start_resets_the_timers_and_keeps_a_resumed_experience_start():
    state = run_state(domain="photos", started_at=123.0)
    state.last_checkpoint = state.last_data = -1.0
    state.start()
    assert state.last_checkpoint > 0 and state.last_data > 0
    assert state.rank_domain == "photos" and state.progress.started_at == 123.0
    fresh = run_state()
    fresh.start()
    assert fresh.progress.started_at == pytest.approx(time.time(), abs=5)


def test_interval_due_counts_from_the_last_checkpoint():
    state = run_state()
    state.start()
    assert not state.interval_due(60.0)
    state.last_checkpoint -= 61.0
    assert state.interval_due(60.0)


def test_idle_needs_the_setting_the_quiet_time_and_no_lag():
    state = run_state()
    state.start()
    lag = Recorder({0: 0})
    assert not state.idle(0, lag) and not lag.calls  # 0: never idle, and no lag asked for
    assert not state.idle(5.0, lag)  # data came just now
    state.last_data -= 6.0
    assert state.idle(5.0, lag)
    assert not state.idle(5.0, lambda: {0: 3})  # records still to read


def test_count_step_measures_from_the_end_of_the_first_step():
    state = run_state()
    state.unstepped_wait = 0.7
    state.count_step(StepResult(1.0, 0.0, 8, False, 2.0), stepped=8)  # warm-up step: not in the totals
    assert state.rate.step_seconds == 0.0 and state.rate.input_wait == 0.0 and state.unstepped_wait == 0.0
    state.rate.update(8)
    state.unstepped_wait = 0.25
    state.count_step(StepResult(1.0, 0.0, 8, True, 0.5), stepped=8)
    assert state.rate.step_seconds == 0.5 and state.rate.input_wait == 0.25
    assert state.rate.images_stepped == 8 and state.progress.steps_skipped == 1


def test_advance_counts_the_step_and_the_world_images():
    state = run_state()
    state.advance(12)
    state.advance(4)
    assert (state.progress.steps, state.progress.images_total, state.progress.images_in_experience) == (2, 16, 16)


def test_follow_domain_keeps_the_first_domain_when_headers_mark_boundaries():
    state = run_state()
    state.follow_domain("a", header_boundaries=True)
    state.follow_domain("b", header_boundaries=True)
    assert state.progress.domain == "a"
    state.follow_domain("c", header_boundaries=False)
    state.follow_domain(None, header_boundaries=False)
    assert state.progress.domain == "c"


def test_start_experience_opens_the_next_one():
    state = run_state(experience=2, images_in_experience=40, images_total=90, domain="a", positions={0: 90})
    state.recent.append(torch.zeros(1))
    old_probes = state.probes
    state.start_experience("b", probe_max_images=7)
    progress = state.progress
    assert (progress.experience, progress.images_in_experience, progress.images_total) == (3, 0, 90)
    assert progress.domain == "b" and progress.first_offsets == {0: 90}
    assert progress.started_at == pytest.approx(time.time(), abs=5)
    assert state.probes is not old_probes and state.probes.experience == 3 and len(state.probes) == 0
    assert not state.recent


def test_recent_keeps_the_last_eight_batches():
    state = run_state()
    for i in range(10):
        state.recent.append(torch.full((1,), i))
    assert [int(t) for t in state.recent] == list(range(2, 10))


# ---- the checkpoint policy


def test_checkpoint_names():
    assert checkpoint_name("experience", 3, 420) == "exp-000003"
    assert checkpoint_name("interval", 3, 420) == "exp-000003-step-000000420"


@pytest.mark.parametrize(("exit_code", "mid_iteration", "distributed", "policy"), [
    (0, False, False, "save"), (0, True, True, "save"),  # a clean stop always saves
    (1, False, False, "try"),  # failed between iterations: consistent state
    (1, True, False, "none"),  # failed inside a step: offsets cover an untrained batch
    (1, False, True, "none"),  # several ranks: the others would not join the save
])
def test_exit_checkpoint_policy(exit_code, mid_iteration, distributed, policy):
    assert exit_checkpoint(exit_code, mid_iteration, distributed) == policy


def fake_checkpointer(state: RunState, world: object, interval_s: float = 60.0) -> Checkpointer:
    settings = SimpleNamespace(checkpoint_interval_s=interval_s, state_dir=Path("/nonexistent"))
    return Checkpointer(settings, world, Metrics(), None, None, None, state,  # type: ignore[arg-type]
                        SimpleNamespace(checkpoint_name="exp-000001"), SimpleNamespace(request_commit=Recorder()),
                        None)


def test_one_process_reads_its_timer_after_the_step_several_ranks_the_agreed_flag():
    state = run_state()
    state.start()
    alone = fake_checkpointer(state, World())
    assert not alone.due_after_step(agreement(checkpoint_due=True))
    state.last_checkpoint -= 61.0
    assert alone.due_after_step(agreement(checkpoint_due=False))
    ranks = fake_checkpointer(state, SimpleNamespace(distributed=True, is_main=False))
    assert ranks.due_after_step(agreement(checkpoint_due=True))
    assert not ranks.due_after_step(agreement(checkpoint_due=False))


def test_interval_saves_and_restarts_the_timer(monkeypatch):
    state = run_state()
    state.last_checkpoint = 0.0
    checkpointer = fake_checkpointer(state, World())
    save = Recorder(False)
    monkeypatch.setattr(checkpointer, "save", save)
    checkpointer.interval()
    assert save.calls == [("interval",)] and not checkpointer.interval_due()  # even after a failed write


def test_at_exit_follows_the_policy(monkeypatch):
    checkpointer = fake_checkpointer(run_state(), World())
    save = Recorder(True)
    monkeypatch.setattr(checkpointer, "save", save)
    checkpointer.at_exit(0, mid_iteration=True)
    checkpointer.at_exit(1, mid_iteration=True)
    assert save.calls == [("interval",)]

    def broken(kind: str) -> bool:
        raise OSError("disk gone")

    monkeypatch.setattr(checkpointer, "save", broken)
    checkpointer.at_exit(1, mid_iteration=False)  # logged, not raised


def test_another_rank_only_commits_its_offsets():
    state = run_state(positions={3: 17})
    world = SimpleNamespace(distributed=True, is_main=False, gather_others=lambda make: [])
    checkpointer = fake_checkpointer(state, world)
    assert checkpointer.save("interval")
    assert checkpointer.prefetcher.request_commit.calls == [({3: 17},)]


# ---- a real checkpoint from a small learner


@pytest.fixture
def small(tmp_path: Path) -> SimpleNamespace:
    settings = Settings(preset="cpu", device="cpu", method="simsiam", strategy="replay", resolution=16, seed=0,
                        state_dir=tmp_path / "state", topic="t", boundary="count,drift", torch_threads=1)
    (settings.state_dir / "metrics").mkdir(parents=True)
    learner = build_learner(settings, World())
    metrics = Metrics()
    buffer = build_buffer(settings)
    buffer.add(["a/1", "a/2"], torch.zeros(2, 3, 16, 16, dtype=torch.uint8), ["a", "a"])
    state = run_state(experience=2, steps=5, images_total=80, positions={0: 80})
    state.pending_rows = [{"experience": 1, "record": {"domain": "a"}}]
    state.probes.add("p/1", torch.zeros(3, 16, 16, dtype=torch.uint8), "0", "a")
    service = SimpleNamespace(checkpoint_name=None, throughput=[])
    prefetcher = SimpleNamespace(request_commit=Recorder())
    indexer = SimpleNamespace(index=SimpleNamespace(centroids=lambda: {}))
    checkpointer = Checkpointer(settings, World(), metrics, learner, buffer, Boundaries(settings, metrics), state,
                                service, prefetcher, indexer)  # type: ignore[arg-type]
    return SimpleNamespace(settings=settings, checkpointer=checkpointer, state=state, metrics=metrics)


def test_save_writes_everything_that_must_agree_and_commits_after(small):
    assert small.checkpointer.save("interval")
    saved = load_latest(small.settings.state_dir / "checkpoints")
    assert saved is not None and saved.name == "exp-000001-step-000000005"
    manifest = saved.manifest
    assert (manifest["kind"], manifest["experience"], manifest["topic"], manifest["strategy"]) == \
        ("interval", 1, "t", "replay")
    assert manifest["world_size"] == 1 and manifest["progress"]["images_total"] == 80
    assert manifest["pending_evaluations"] == [{"experience": 1, "record": {"domain": "a"}}]  # re-queued at restart
    assert {"model.safetensors", "optimizer.pt", "offsets.json", "probes.safetensors", "drift.safetensors",
            "replay/buffer.safetensors", "replay/buffer.json"} <= set(manifest["files"])
    assert json.loads((saved.path / "offsets.json").read_text())["positions"] == {"0": 80}
    assert small.checkpointer.service.checkpoint_name == saved.name
    assert small.checkpointer.prefetcher.request_commit.calls == [({0: 80},)]
    assert (small.settings.state_dir / "metrics" / "history.json").is_file()  # the metrics export
    assert small.metrics.checkpoint_seconds._sum.get() > 0


def test_a_failed_write_keeps_the_previous_checkpoint_and_commits_nothing(small, monkeypatch):
    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(daemon, "write_checkpoint", full_disk)
    assert not small.checkpointer.save("experience")
    assert small.checkpointer.service.checkpoint_name is None
    assert not small.checkpointer.prefetcher.request_commit.calls
    assert small.metrics.checkpoint_errors.labels("OSError")._value.get() == 1


# ---- the experience end


def loop_daemon(state: RunState, save_ok: bool = True, **overrides: object) -> SimpleNamespace:
    settings = SimpleNamespace(probe_max_images=5, state_dir=Path("/nonexistent"), replay_share=0.25,
                               exit_when_idle_s=0, topic="t")
    parts = {"settings": settings, "state": state, "world": World(), "learner": SimpleNamespace(regularizer=None),
             "boundaries": SimpleNamespace(ended=Recorder(0), pending=None),
             "checkpointer": SimpleNamespace(save=Recorder(save_ok), root=Path("/ckpt"), interval_due=lambda: True),
             "indexer": SimpleNamespace(new_encoder=Recorder()), "buffer": None,
             "stop": SimpleNamespace(requested=False)}
    return SimpleNamespace(**{**parts, **overrides})


def test_end_experience_evaluates_opens_the_next_checkpoints_and_reembeds(monkeypatch):
    evaluated = Recorder()
    monkeypatch.setattr(daemon, "submit_evaluation", evaluated)
    state = run_state(experience=4, images_in_experience=30, domain="a", steps=9)
    d = loop_daemon(state)
    end_experience(d, "count", None, "a")
    assert d.boundaries.ended.calls == [("count", None, state.progress)]
    (_, ended, record), = evaluated.calls
    assert ended == 4 and record["boundary"] == "count" and record["domain"] == "a"
    assert state.progress.experience == 5 and state.probes.experience == 5
    assert d.checkpointer.save.calls == [("experience",)]
    assert d.indexer.new_encoder.calls == [(4, Path("/ckpt/exp-000004"))]


def test_a_drift_end_hands_what_came_after_the_change_point_to_the_next_experience(monkeypatch):
    evaluated = Recorder()
    monkeypatch.setattr(daemon, "submit_evaluation", evaluated)
    state = run_state(experience=4, images_in_experience=30, domain="default", steps=9)
    for i, trained in enumerate((0, 10, 20, 25)):  # probes kept when 0, 10, 20 and 25 images were trained
        state.probes.add(f"p/{i}", torch.full((3, 8, 8), i, dtype=torch.uint8), None, "default", trained)
    ended_probes = state.probes
    d = loop_daemon(state, boundaries=SimpleNamespace(ended=Recorder(12), pending=None),
                    indexer=SimpleNamespace(new_encoder=Recorder(), hand_over=Recorder()))
    end_experience(d, "drift", 9.0, None)  # the change point was 12 images before the cut: at 18
    (_, _, record), = evaluated.calls
    assert record["images_after_change"] == 12
    assert d.indexer.hand_over.calls == [(4, 5, 12)]  # the store and index file them under experience 5
    assert ended_probes.sample_ids == ["p/0", "p/1"] and ended_probes.positions == [0, 10]
    assert state.probes.experience == 5 and state.probes.sample_ids == ["p/2", "p/3"]
    assert [int(image[0, 0, 0]) for image in state.probes.images] == [2, 3]


def test_a_probe_set_keeps_its_positions_and_reads_older_files(tmp_path):
    probes = ProbeSet(3, 10)
    probes.add("a", torch.zeros(3, 8, 8, dtype=torch.uint8), "x", "d", 7)
    probes.save(tmp_path / "p.safetensors")
    assert ProbeSet.load(tmp_path / "p.safetensors").positions == [7]
    meta = json.loads((tmp_path / "p.json").read_text())
    del meta["positions"]  # written before positions were kept
    (tmp_path / "p.json").write_text(json.dumps(meta))
    assert ProbeSet.load(tmp_path / "p.safetensors").positions == [0]


def test_no_reembedding_after_a_failed_experience_checkpoint(monkeypatch):
    monkeypatch.setattr(daemon, "submit_evaluation", Recorder())
    d = loop_daemon(run_state(experience=2), save_ok=False)
    end_experience(d, "header", None, "b")
    assert not d.indexer.new_encoder.calls and d.state.progress.domain == "b"


def test_an_experience_end_queues_its_row_and_the_loop_applies_it_in_order(tmp_path):
    from deploy.evaluate import EvalRow
    from deploy.evaluator import Evaluation

    learner = build_learner(Settings(preset="cpu", device="cpu", resolution=16, seed=0, torch_threads=1), World())
    state = run_state(experience=3, images_in_experience=30, images_total=90)
    state.probe_sets = {1: ProbeSet(1, 5), 2: ProbeSet(2, 5)}
    submitted, published = [], []
    evaluator = SimpleNamespace(wait_below=Recorder(), submit=submitted.append)
    catalog = SimpleNamespace(name_experience=Recorder())
    d = loop_daemon(state, learner=learner, evaluator=evaluator, settings=SimpleNamespace(state_dir=tmp_path),
                    indexer=SimpleNamespace(store=SimpleNamespace(catalog=catalog)),
                    service=SimpleNamespace(publish_evaluation=published.append))
    daemon.submit_evaluation(d, 3, {"domain": "c"})
    (job,) = submitted
    assert job.experience == 3 and sorted(job.probe_sets) == [1, 2, 3] and job.probe_sets[3] is state.probes
    assert job.record["images"] == 30 and job.record["images_total"] == 90 and job.record["domain"] == "c"
    weight = next(learner.method.parameters())
    assert job.model.method is not learner.method  # a copy: training goes on changing the learner
    assert torch.equal(next(job.model.method.parameters()), weight) and not next(job.model.method.parameters()).requires_grad
    assert state.pending_rows == [{"experience": 3, "record": job.record}]
    assert evaluator.wait_below.calls == [(daemon.MAX_PENDING,)]
    assert (tmp_path / "metrics" / "probes").is_dir()  # the probe set is kept at once, not when scored

    rows = [Evaluation(3, EvalRow([0.5, None, 0.9], [0.6, None, 0.8], [1, None, 1], [2.0, None, 1.0]), {"k": 4},
                       job.record, 1.5)]
    daemon.apply_evaluations(d, rows)
    assert state.history.experiences == [3] and state.history.accuracy == [[0.5, None, 0.9]]
    assert state.history.baselines == {"3": {"k": 4}} and state.pending_rows == []
    assert published == [state.history]
    daemon.apply_evaluations(d, [])
    assert len(published) == 1  # nothing new: nothing published


# ---- a rank's batch and tick


def test_no_replay_before_the_buffer_holds_images():
    state = run_state()
    buffer = build_buffer(Settings(replay_max_images=10))
    got = SimpleNamespace(samples=[sample(1), sample(2)], prepared=Prepared.of([sample(1), sample(2)], 0.0, False),
                          positions={0: 3})
    d = loop_daemon(state, buffer=buffer, prefetcher=SimpleNamespace(get=lambda timeout: got))
    assert next_batch(d).replay is None
    buffer.add(["x/1", "x/2"], torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["x", "x"])
    batch = next_batch(d)
    assert batch.replay is not None and len(batch.replay) == 1  # 2 stream images at a replay share of 1/4
    assert batch.stepped == 3 and batch.domain == "d" and batch.positions == {0: 3}


def test_an_empty_poll_is_an_empty_batch():
    d = loop_daemon(run_state(), prefetcher=SimpleNamespace(get=lambda timeout: None))
    batch = next_batch(d)
    assert (batch.samples, batch.positions, batch.replay, batch.stepped, batch.domain) == ([], {}, None, 0, None)


def test_tick_says_what_this_rank_has_and_wants():
    state = run_state()
    state.start()
    state.rank_domain = "a"
    d = loop_daemon(state, prefetcher=SimpleNamespace(lag=lambda: {0: 5}))
    samples = [sample(1, "b"), sample(2, "b")]
    t = tick(d, Batch(samples, Prepared.of(samples, 0.0, False), {0: 3}))
    assert t == Tick(records=2, images=2, stepped=2, domain="b", changed_to="b", checkpoint_due=True, lag={})


def test_domain_change_only_on_a_switch():
    assert domain_change("b", "a") == "b"
    assert domain_change("a", "a") is None
    assert domain_change("a", None) is None  # the first domain this rank sees
    assert domain_change(None, "a") is None


# ---- the world of one


def test_a_world_of_one_agrees_with_itself_and_has_no_others():
    agreed = World().agree(Tick(records=3, images=2, stepped=4, domain="a", checkpoint_due=True), "a")
    assert (agreed.records, agreed.images, agreed.stepped, agreed.per_rank) == (3, 2, 4, [4])
    assert agreed.checkpoint_due and agreed.boundary_to is None and agreed.weight(0, 1) == 1.0
    made = Recorder([1])
    assert World().gather_others(made) == [] and not made.calls


def test_throughput_measures_from_the_end_of_the_first_step():
    rate = Throughput(window_s=10.0)
    rate.images_stepped += 4
    rate.update(4)
    assert rate.images_stepped == 0 and rate.first_at is not None and rate.elapsed() == 0.0
