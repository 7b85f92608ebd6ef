"""SnapshotEngine: routing to the right experience, label-aware routing, SEPT, export, validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deploy.http_api import error_status
from deploy.indexer import backbone_from_checkpoint
from deploy.metrics import Metrics
from deploy.multipart import MultipartError, encode_form_data, parse_form_data
from deploy.snapshot_errors import SnapshotError
from deploy.snapshot_files import check_name
from deploy.snapshot_request import create_from_request, parse_labels_csv
from deploy.snapshots import SnapshotEngine
from learners.backbones import ResNet18
from learners.snapshot import load_snapshot
from safefiles.files import sha256_file
from tests.snapshot_testkit import (
    KWARGS,
    RES,
    build_state,
    open_indexer,
    submit_colour,
    target_images,
)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """Experience 1 stored red images, experience 2 blue ones; the index is at encoder version 2."""
    return build_state(tmp_path_factory.mktemp("state"), {1: "red", 2: "blue"})


@pytest.fixture
def engine(state):
    """An offline engine on the state (released after the test)."""
    engine = SnapshotEngine.open_offline(state, "cpu")
    yield engine
    engine.close()


def _features(backbone, seed=0):
    x = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return backbone.eval()(x)


@pytest.mark.parametrize(("colour", "expected"), [("blue", 2), ("red", 1)])
def test_route_picks_the_experience_the_targets_resemble(engine, colour, expected):
    manifest = engine.create(target_images(colour, 6), strategy="route", name=f"route-{colour}")
    assert manifest["chosen_experience"] == expected
    candidates = manifest["candidates"]
    assert [c["experience"] for c in candidates][0] == expected
    assert sorted(c["experience"] for c in candidates) == [1, 2]
    assert candidates[0]["vote_share"] > candidates[1]["vote_share"]
    assert sum(c["vote_share"] for c in candidates) == pytest.approx(1.0)
    assert manifest["encoder_version"] == 2 and manifest["target_count"] == 6
    assert manifest["index_freshness"] == {"versions_behind": 0, "unindexed": 0}
    assert manifest["retrieved_count"] == 0 and manifest["sept_steps"] == 0 and not manifest["labels_used"]


def test_route_snapshot_loads_both_ways_with_the_checkpoint_features(engine, state):
    manifest = engine.create(target_images("blue", 4), strategy="route", name="export")
    folder = state / "snapshots" / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.safetensors"]
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["files"]["model.safetensors"] == sha256_file(folder / "model.safetensors")
    assert manifest["backbone"] == {"name": "resnet18", "class": "learners.backbones.ResNet18", "kwargs": KWARGS}
    assert manifest["input"]["resolution"] == RES

    reference, _ = backbone_from_checkpoint(state / "checkpoints" / "exp-000002", "cpu")
    plain = ResNet18(**manifest["backbone"]["kwargs"])
    plain.load_state_dict(load_file(str(folder / "model.safetensors")))
    expected = _features(reference)
    assert torch.equal(_features(load_snapshot(folder)), expected)
    assert torch.equal(_features(plain), expected)
    other, _ = backbone_from_checkpoint(state / "checkpoints" / "exp-000001", "cpu")
    assert not torch.equal(_features(other), expected)  # the comparison can tell checkpoints apart


def test_sept_continues_ssl_on_retrieved_samples(engine, state):
    manifest = engine.create(target_images("blue", 6), strategy="route+sept", budget=16, name="sept")
    assert manifest["chosen_experience"] == 2 and manifest["source_checkpoint"] == "exp-000002"
    assert 2 <= manifest["retrieved_count"] <= 16 and manifest["budget"] == 16
    assert manifest["retrieved_share"] == pytest.approx(manifest["retrieved_count"] / 48)
    # The nearest stored samples of blue targets are the blue experience's.
    assert manifest["retrieved_by_experience"].get("2", 0) > manifest["retrieved_by_experience"].get("1", 0)
    assert manifest["sept_steps"] == 10  # 10 epochs of one batch (16 images < the preset's 64)

    start, _ = backbone_from_checkpoint(state / "checkpoints" / "exp-000002", "cpu")
    tuned = load_snapshot(state / "snapshots" / "sept")
    assert not torch.equal(_features(tuned), _features(start))
    assert torch.isfinite(_features(tuned)).all()


def test_sept_alone_starts_from_the_latest_checkpoint(engine):
    manifest = engine.create(target_images("red", 4), strategy="sept", budget=8, epochs=2, name="sept-red")
    assert manifest["chosen_experience"] == 2  # the latest, though route would pick 1
    assert manifest["candidates"][0]["experience"] == 1
    assert manifest["retrieved_count"] <= 8 and manifest["sept_steps"] == 2


def test_sept_trains_only_on_retrieved_samples_like_the_targets(state):
    # The store holds red and blue images: the nearest of green targets are not like them.
    engine = SnapshotEngine.open_offline(state, "cpu")
    try:
        like = engine.create(target_images("blue", 8), strategy="sept", budget=16, epochs=1, name="like")
        unlike = engine.create(target_images("green", 8), strategy="sept", budget=16, epochs=1, name="unlike")
    finally:
        engine.close()
    assert like["relevance"] == {"k": 5, "retrieved": 16, "kept": 16} and like["retrieved_count"] == 16
    assert unlike["relevance"] == {"k": 5, "retrieved": 16, "kept": 0} and unlike["retrieved_count"] == 0
    assert unlike["sept_steps"] == 1 and unlike["retrieved_by_experience"] == {}  # the targets alone trained
    engine = SnapshotEngine.open_offline(state, "cpu", relevance_k=0)  # off: all it retrieved
    try:
        kept_all = engine.create(target_images("green", 8), strategy="sept", budget=16, epochs=1, name="unlike-all")
    finally:
        engine.close()
    assert kept_all["relevance"] is None and kept_all["retrieved_count"] == 16


def test_labels_pick_the_candidate_whose_features_separate_the_classes(tmp_path):
    # Experience 2 (blue) is the top vote for blue targets, but its checkpoint is dead
    # (constant features): with labels, a healthy checkpoint wins on kNN accuracy.
    state = build_state(tmp_path, {1: "red", 2: "blue", 3: "green"}, n=16, probes=0, dead=frozenset({2}))
    targets = target_images("dark-blue", 4) + target_images("light-blue", 4)
    labels = {filename: filename.rsplit("-", 1)[0] for filename, _ in targets}
    engine = SnapshotEngine.open_offline(state, "cpu")
    try:
        unlabelled = engine.create(targets, strategy="route")
        labelled = engine.create(targets, labels=labels, strategy="route")
    finally:
        engine.close()
    assert unlabelled["chosen_experience"] == 2 and not unlabelled["labels_used"]
    accuracy = {c["experience"]: c["knn_accuracy"] for c in labelled["candidates"]}
    assert labelled["labels_used"] and labelled["labelled_count"] == 8
    assert labelled["candidates"][0]["experience"] == 2 and accuracy[2] <= 0.5  # at most chance
    assert labelled["chosen_experience"] != 2 and accuracy[labelled["chosen_experience"]] == 1.0
    # what the user reads: the exported backbone (route: the chosen checkpoint's) next to the latest's
    check = labelled["label_check"]
    assert unlabelled["label_check"] is None and check["latest_checkpoint"] == "exp-000003"
    assert check["snapshot_knn"] == pytest.approx(accuracy[labelled["chosen_experience"]], abs=1e-4)
    if 3 in accuracy:
        assert check["latest_knn"] == pytest.approx(accuracy[3], abs=1e-4)


def test_names_paths_and_inputs_are_validated(engine, state, tmp_path):
    blue = target_images("blue", 2)
    for bad in ("../escape", "a/b", "", ".hidden", "x" * 65, "snap\n"):
        with pytest.raises(SnapshotError) as err:
            check_name(bad)
        assert error_status(err.value) == 400
    with pytest.raises(SnapshotError) as err:
        engine.describe("../checkpoints")
    assert error_status(err.value) == 400
    with pytest.raises(SnapshotError) as err:
        engine.describe("never-made")
    assert error_status(err.value) == 404

    engine.create(blue, strategy="route", name="taken")
    assert engine.describe("taken")["name"] == "taken"
    assert engine.file_path("taken", "model.safetensors").is_file()
    for filename in ("optimizer.pt", "../manifest.json", ""):
        with pytest.raises(SnapshotError) as err:
            engine.file_path("taken", filename)
        assert error_status(err.value) == 404
    with pytest.raises(SnapshotError) as err:
        engine.create(blue, strategy="route", name="taken")
    assert error_status(err.value) == 409

    cases = [
        ({"targets": blue, "strategy": "magic"}, "strategy"),
        ({"targets": blue, "budget": 0}, "budget"),
        ({"targets": blue, "budget": "lots"}, "budget"),
        ({"targets": [("broken.png", b"\x89PNG\r\n\x1a\nnot really")]}, "broken.png"),
        ({"targets": [("notes.txt", b"hello")]}, "notes.txt"),
        ({"targets": []}, "no target"),
        ({"targets": blue, "labels": {"missing.png": "a"}}, "missing.png"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(SnapshotError) as err:
            engine.create(**kwargs)
        assert error_status(err.value) == 400 and needle in err.value.message
    assert not list((state / "snapshots").glob(".tmp-*"))


def test_json_requests_stay_inside_the_targets_dir(engine, tmp_path):
    targets = tmp_path / "targets"
    (targets / "task").mkdir(parents=True)
    for filename, data in target_images("blue", 3):
        (targets / "task" / filename).write_bytes(data)
    (targets / "task" / "labels.csv").write_text("filename,label\nblue-0.png,a\nblue-1.png,b\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(target_images("red", 1)[0][1])
    (targets / "escape").symlink_to(outside)
    (targets / "task2").mkdir()
    (targets / "task2" / "linked.png").symlink_to(outside / "secret.png")

    def post(payload):
        return create_from_request(engine, "application/json", json.dumps(payload).encode())

    with pytest.raises(SnapshotError) as err:
        post({"target_path": "task"})
    assert error_status(err.value) == 400 and "TAILORD_TARGETS_DIR" in err.value.message  # not configured
    engine.targets_dir = targets
    for path in ("../outside", str(outside), "escape", "task2", "task/../../outside"):
        with pytest.raises(SnapshotError) as err:
            post({"target_path": path})
        assert error_status(err.value) == 400, path
    with pytest.raises(SnapshotError) as err:
        post({"target_path": "task", "labels_path": "../outside/secret.png"})
    assert error_status(err.value) == 400
    with pytest.raises(SnapshotError) as err:
        post({"target_path": "task", "strategy": "route", "color": "blue"})
    assert error_status(err.value) == 400 and "color" in err.value.message

    status, manifest = post({"target_path": str(targets / "task"), "labels_path": "task/labels.csv",
                             "strategy": "route", "name": "from-path"})
    assert status == 201 and manifest["target_count"] == 3 and manifest["labelled_count"] == 2
    assert manifest["chosen_experience"] == 2


def test_multipart_requests_and_metrics(state):
    metrics = Metrics()
    engine = SnapshotEngine.open_offline(state, "cpu")
    engine.metrics = metrics
    try:
        files = [("images", filename, data) for filename, data in target_images("red", 4)]
        files.append(("labels", "labels.csv", b"red-0.png,x\nred-1.png,y\n"))
        content_type, body = encode_form_data({"strategy": "route", "name": "uploaded"}, files)
        status, manifest = create_from_request(engine, content_type, body)
        assert status == 201 and manifest["chosen_experience"] == 1
        assert manifest["target_count"] == 4 and manifest["labelled_count"] == 2
        for content_type, body in [
            (encode_form_data({"strategy": "route", "budget": "-3"}, files)),
            (encode_form_data({"colour": "red"}, files)),
            ("multipart/form-data; boundary=zzz", b"--zzz\r\nContent-Disposition: form-data; name=\"images\""),
            ("text/plain", b"hi"),
        ]:
            with pytest.raises(SnapshotError) as err:
                create_from_request(engine, content_type, body)
            assert 400 <= error_status(err.value) < 500
    finally:
        engine.close()
    sample = metrics.registry.get_sample_value
    assert sample("tailord_snapshot_requests_total", {"strategy": "route", "outcome": "ok"}) == 1
    assert sample("tailord_snapshot_requests_total", {"strategy": "invalid", "outcome": "rejected"}) == 4
    assert sample("tailord_snapshot_seconds_count") == 1


def test_multipart_round_trip_keeps_bytes_exact():
    tricky = b"--abc\r\n\r\n--\r\nContent-Disposition: x\r\n" + bytes(range(256)) * 3
    files = [("images", "one.png", tricky), ("images", "été.png", b""), ("labels", "l.csv", b"a,b\r\n")]
    content_type, body = encode_form_data({"strategy": "route+sept", "name": "x"}, files)
    parts = parse_form_data(content_type, body)
    assert [(p.name, p.filename, p.content) for p in parts] == [
        ("strategy", None, b"route+sept"), ("name", None, b"x"), *files]
    for bad_type, bad_body in [(content_type, body[:-10]), ("multipart/form-data", body),
                               ("application/json", body)]:
        with pytest.raises(MultipartError):
            parse_form_data(bad_type, bad_body)


def test_labels_csv():
    assert parse_labels_csv("filename,label\na.png, cat\n\nb.png,dog\n") == {"a.png": "cat", "b.png": "dog"}
    with pytest.raises(SnapshotError):
        parse_labels_csv("a.png,cat,extra\n")


def test_no_finished_experience_and_a_running_daemon_give_409(tmp_path):
    indexer = open_indexer(tmp_path)
    try:
        submit_colour(indexer, 1, "red", 4)
        assert indexer.flush(30)
        (tmp_path / "checkpoints").mkdir()
        with pytest.raises(SnapshotError) as err:  # the daemon's indexer holds the state dir
            SnapshotEngine.open_offline(tmp_path, "cpu")
        assert error_status(err.value) == 409 and "running daemon" in err.value.message
        online = SnapshotEngine(tmp_path, indexer.store, indexer.index, "cpu", RES)
        with pytest.raises(SnapshotError) as err:
            online.create(target_images("red", 2), strategy="route")
        assert error_status(err.value) == 409 and "no experience finished" in err.value.message
    finally:
        indexer.stop()


@pytest.mark.parametrize("runner_up_extra,switched", [(1, False), (3, False), (4, True)])
def test_labels_overturn_the_vote_only_by_more_than_luck(engine, state, monkeypatch, runner_up_extra, switched):
    """On 40 labelled images the runner-up gets `runner_up_extra` more right than the top vote
    (and nothing the top vote gets right wrong): one or three lucky images keep the vote's
    choice (McNemar z 1.0, 1.7), four switch (z 2.0)."""
    import deploy.snapshots as snapshots

    top = torch.tensor([True] * 30 + [False] * 10)
    runner_up = top.clone()
    runner_up[30:30 + runner_up_extra] = True
    answers = iter([top, runner_up])
    monkeypatch.setattr(snapshots, "loo_knn_correct", lambda features, labels: next(answers))
    images = torch.zeros(40, 3, 16, 16, dtype=torch.uint8)
    names = [f"img-{i}.png" for i in range(40)]
    labels = {name: str(i % 2) for i, name in enumerate(names)}
    candidates = [{"experience": 1, "vote_share": 0.6}, {"experience": 2, "vote_share": 0.4}]
    checkpoints = {exp: state / "checkpoints" / f"exp-{exp:06d}" for exp in (1, 2)}
    chosen = engine._choose(candidates, images, names, labels, checkpoints)
    assert chosen == (2 if switched else 1)
    assert candidates[1]["knn_accuracy"] == pytest.approx((30 + runner_up_extra) / 40)


def test_manifest_says_how_far_the_index_lagged(tmp_path):
    """A checkpoint the index has not caught up with, and samples stored but not embedded yet."""
    from replay.store import SampleStore
    from tests.snapshot_testkit import colour_png, write_experience_checkpoint

    state = build_state(tmp_path / "state", {1: "red", 2: "blue"}, n=8, probes=0)
    write_experience_checkpoint(state, 3, seed=3)  # a crash before its refresh began
    store = SampleStore(state, 1 << 30)
    store.add(["late-1", "late-2"], [colour_png("blue", 7), colour_png("blue", 8)], 3, ["blue"] * 2)
    store.close()
    engine = SnapshotEngine.open_offline(state, "cpu")
    try:
        manifest = engine.create(target_images("blue", 4), strategy="route", name="lagging")
    finally:
        engine.close()
    assert manifest["encoder_version"] == 2
    assert manifest["index_freshness"] == {"versions_behind": 1, "unindexed": 2}
