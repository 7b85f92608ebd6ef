"""benchmarks/snapshot.py's pure parts: target draws (disjoint, class-major, never the streamed
prefix), the summaries over seeds and the targets' seed-std rule, on hand-made results."""

import argparse

import pytest

from benchmarks.snapshot import (
    ARMS,
    SHOTS,
    TASKS,
    TargetTask,
    check_targets,
    draw_targets,
    summarize_routing,
    summarize_scores,
)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"classes": 10, "test_per_class": 3, "pool": 400, "routing_sets": 2,
                                 "routing_per_class": 2, **kw})


def test_draws_are_disjoint_class_major_and_skip_the_streamed_prefix() -> None:
    task = TargetTask("digits", "builtin:digits", "digits", "same source", after_stream=True)
    target = draw_targets(task, skip=100, args=_args(), seed=1, extra_max=7)
    names = [f for f, _, _ in target.shots]
    assert len(target.shots) == max(SHOTS) * 10 and len(target.test) == 30 and len(target.extra) == 7
    assert sorted(target.routing) == [str(d) for d in range(10)]
    assert all(len(images) == 4 for images in target.routing.values()), "2 sets x 2 per class"
    labels = [label for *_, label in target.shots]
    assert sorted(set(labels[:10])) == [str(d) for d in range(10)], "each 10-prefix holds one shot per class"
    routing = [data for images in target.routing.values() for data in images]
    encoded = [data for _, data, _ in target.shots] + [d for d, _ in target.test] + routing + target.extra
    assert len(set(encoded)) == len(encoded), "shots, test and rest share no image"
    from itertools import islice

    from streamer.sources import open_source
    streamed = {item.encoded for item in islice(open_source("builtin:digits").items, 100)}
    assert not streamed & set(encoded), "a target image was in the streamed prefix"
    again = draw_targets(task, skip=100, args=_args(), seed=1, extra_max=7)
    assert [f for f, _, _ in again.shots] == names
    assert [f for f, _, _ in draw_targets(task, skip=100, args=_args(), seed=2, extra_max=7).shots] != names


def _run(seed: int, bump: float) -> dict:
    """Every arm scores 50 but route+sept, which scores 50 + bump (+ seed noise)."""
    score = {f"{n}-shot": {"knn": 50.0, "linear": 50.0} for n in SHOTS}
    scores = {t.name: {arm: {k: dict(v) for k, v in score.items()} for arm in ARMS} for t in TASKS}
    for t in TASKS:
        for shots in scores[t.name]["route+sept"].values():
            shots["knn"] = shots["linear"] = 50.0 + bump + seed
    routing = {kind: [{"task": t.name, "kind": t.kind, "what": "x", "chosen": t.domain, "correct": True,
                       "candidates": [{"domain": t.domain}]} for t in TASKS] for kind in ("unlabelled", "labelled")}
    routing["labelled"][-1].update(chosen="fashion", correct=False)  # against the vote
    return {"scores": scores, "routing": routing}


@pytest.mark.parametrize(("bump", "passed"), [(5.0, True), (1.5, False)])
def test_targets_need_the_gap_and_more_than_the_seed_std(bump: float, passed: bool) -> None:
    runs = [_run(seed, bump) for seed in range(3)]
    scores, routing = summarize_scores(runs), summarize_routing(runs)
    assert scores["means"]["all"]["route+sept"]["5-shot"]["knn"]["mean"] == pytest.approx(51.0 + bump)
    assert scores["means"]["all"]["route+sept"]["5-shot"]["knn"]["std"] == pytest.approx(1.0)
    checks = check_targets(scores["means"], routing, None, {"flat": {"p50_ms": 300.0}})
    assert checks["route_sept_ge_latest_plus_3_knn"]["passed"] is passed
    assert checks["route_sept_ge_target_only_plus_1_linear"]["passed"] is True
    paired = checks["route_sept_ge_target_only_plus_1_knn"]["paired"]  # seed by seed: bump + seed
    assert paired["per_seed"] == [pytest.approx(bump + s) for s in range(3)] and paired["std"] == pytest.approx(1.0)
    assert checks["routing_unlabelled_different_source"]["passed"] is True
    assert routing["labelled"]["different source"]["accuracy"] == 0.0
    assert routing["labelled"]["all"]["against_vote"] == 3 and routing["unlabelled"]["all"]["against_vote"] == 0
    assert checks["routing_labelled_different_source"]["passed"] is False
    assert checks["all_passed"] is False


def test_reuse_state_scores_a_kept_state_without_streaming(tmp_path, monkeypatch) -> None:
    import json

    import benchmarks.snapshot as bench
    from replay.retrieval import RELEVANCE_K

    with pytest.raises(SystemExit):
        bench.parse_args(["--reuse-state"])  # nothing to reuse without --state-dir
    args = bench.parse_args(["--reuse-state", "--state-dir", str(tmp_path), "--relevance-k", "0"])
    assert args.relevance_k == 0 and bench.parse_args([]).relevance_k == RELEVANCE_K
    state = tmp_path / "seed-0"
    (state / "checkpoints").mkdir(parents=True)
    (state / "metrics").mkdir()
    (state / "metrics" / "history.json").write_text(json.dumps({"records": [{"experience": 1, "domain": "digits"}]}))
    monkeypatch.setattr(bench, "run_daemon", lambda *a: pytest.fail("a kept state was streamed again"))
    run = bench.SeedRun(args, 0, state)
    assert run.stream()[1:] == ([], 0.0) and run.exp_domain == {1: "digits"}
