"""`tailord snapshot`/`status` client: upload + download over the real admin HTTP server, offline mode."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import structlog
import torch

from deploy.cli import main
from deploy.errors import UsageError
from deploy.http_api import start_http
from deploy.snapshot_client import (
    AdminError,
    admin_get,
    request_snapshot,
    resolve_endpoint,
    summary_line,
)
from deploy.snapshot_request import create_from_request
from deploy.snapshots import SnapshotEngine
from learners.snapshot import load_snapshot
from tests.snapshot_testkit import RES, build_state, open_indexer, target_images

TOKEN = "s3cret"


class Backend:
    """The admin part of DaemonService, over a real SnapshotEngine."""

    def __init__(self, engine: SnapshotEngine) -> None:
        self.engine = engine

    def status(self):
        return {"index_size": self.engine.index.size}

    def create_snapshot(self, content_type, body):
        return create_from_request(self.engine, content_type, body)

    def get_snapshot(self, name):
        return self.engine.describe(name)

    def snapshot_file(self, name, filename):
        return self.engine.file_path(name, filename)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return build_state(tmp_path_factory.mktemp("state"), {1: "red", 2: "blue"})


@pytest.fixture
def daemon(state):
    """A running indexer + snapshot engine behind the admin HTTP server; yields its URL."""
    indexer = open_indexer(state)
    engine = SnapshotEngine(state, indexer.store, indexer.index, "cpu", RES)
    server = start_http("127.0.0.1", 0, Backend(engine), TOKEN, 16 << 20)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        indexer.stop()


def _target_dir(root: Path, colour: str, n: int = 4) -> Path:
    folder = root / colour
    folder.mkdir()
    for filename, data in target_images(colour, n):
        (folder / filename).write_bytes(data)
    (folder / "README.txt").write_text("not an image: skipped")
    return folder


def test_online_snapshot_uploads_targets_and_downloads_the_files(daemon, tmp_path):
    target = _target_dir(tmp_path, "blue")
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nblue-0.png,a\nblue-1.png,b\n")
    out = tmp_path / "out"
    result = request_snapshot(target=str(target), labels=str(labels), out=str(out), strategy="route",
                              budget=None, state_dir=None, url=daemon, token=TOKEN, config=None)
    assert result["chosen_experience"] == 2 and result["strategy"] == "route" and result["mode"] == "online"
    assert result["path"] == str(out.resolve()) and result["retrieved_count"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == result["name"] and manifest["target_count"] == 4
    assert manifest["labelled_count"] == 2
    data = (out / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["files"]["model.safetensors"]
    assert load_snapshot(out)(torch.zeros(1, 3, RES, RES)).shape == (1, 64)

    assert admin_get(daemon, f"/admin/snapshots/{result['name']}", TOKEN) == manifest
    assert admin_get(daemon, "/admin/status", TOKEN)["index_size"] == 48


def test_online_errors_are_one_line(daemon, tmp_path):
    with pytest.raises(AdminError, match="HTTP 401"):
        admin_get(daemon, "/admin/status", "wrong")
    with pytest.raises(AdminError, match="HTTP 404: no snapshot"):
        admin_get(daemon, "/admin/snapshots/missing", TOKEN)
    with pytest.raises(AdminError, match="HTTP 400"):
        admin_get(daemon, "/admin/snapshots/..%2f..%2fetc", TOKEN)
    with pytest.raises(AdminError, match="HTTP 400.*strategy"):
        request_snapshot(_target_dir(tmp_path, "red"), None, tmp_path / "out", "bogus", None, None,
                         daemon, TOKEN, None)
    with pytest.raises(AdminError, match="cannot reach the daemon"):
        admin_get("http://127.0.0.1:9", "/admin/status", TOKEN)
    with pytest.raises(UsageError, match="not a folder"):
        request_snapshot(tmp_path / "nope", None, tmp_path / "out", "route", None, None, daemon, TOKEN, None)


@pytest.fixture
def restore_logging():
    """`main` points structlog at the captured stderr; later tests must not log into it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_cli_status_prints_json_and_fails_in_one_line(daemon, capsys, restore_logging, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "wrong").write_text("wrong")
    assert main(["status", "--url", daemon, "--token-file", str(tmp_path / "token")]) == 0
    assert json.loads(capsys.readouterr().out) == {"index_size": 48}
    assert main(["status", "--url", daemon, "--token-file", str(tmp_path / "wrong")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 401" in err


def test_offline_snapshot_on_a_stopped_daemons_state(state, tmp_path):
    out = tmp_path / "out"
    result = request_snapshot(_target_dir(tmp_path, "red"), None, out, "route+sept", 8, state, None, None, None,
                              epochs=2)
    assert result["mode"] == "offline" and result["chosen_experience"] == 1
    assert json.loads((out / "manifest.json").read_text())["sept_epochs"] == 2
    assert 0 < result["retrieved_count"] <= 8 and result["sept_steps"] > 0
    assert (state / "snapshots" / result["name"] / "model.safetensors").read_bytes() == \
        (out / "model.safetensors").read_bytes()
    load_snapshot(out)


def _default_strategy_used(result: dict) -> None:
    """DEFAULT_STRATEGY, SEPT from the newest checkpoint, while the vote still routes red targets to experience 1."""
    from deploy.snapshots import DEFAULT_STRATEGY

    assert result["strategy"] == DEFAULT_STRATEGY == "sept" and result["chosen_experience"] == 2
    assert result["candidates"][0]["experience"] == 1 and result["sept_steps"] > 0


def test_an_online_request_without_a_strategy_gets_sept(daemon, tmp_path):
    _default_strategy_used(request_snapshot(_target_dir(tmp_path, "red"), None, tmp_path / "out", None, 8, None,
                                            daemon, TOKEN, None, epochs=1))


def test_an_offline_request_without_a_strategy_gets_sept(state, tmp_path):
    _default_strategy_used(request_snapshot(_target_dir(tmp_path, "red"), None, tmp_path / "out", None, 8, state,
                                            None, None, None, epochs=1))


def test_epochs_reach_the_daemon_from_the_client_and_the_cli(daemon, capsys, restore_logging, tmp_path):
    with pytest.raises(AdminError, match="HTTP 400.*epochs must be"):  # the form field is sent and checked
        request_snapshot(_target_dir(tmp_path, "red"), None, tmp_path / "out", "sept", None, None,
                         daemon, TOKEN, None, epochs=0)
    (tmp_path / "token").write_text(TOKEN)
    assert main(["snapshot", "--target", str(_target_dir(tmp_path, "blue")), "--out", str(tmp_path / "cli"),
                 "--strategy", "sept", "--epochs", "0", "--url", daemon, "--token-file", str(tmp_path / "token")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epochs must be" in err


def test_offline_refuses_a_running_daemons_state(daemon, state, tmp_path):
    with pytest.raises(AdminError, match="running daemon"):
        request_snapshot(_target_dir(tmp_path, "red"), None, tmp_path / "out", "route", None, state,
                         None, None, None)


def test_endpoint_defaults_come_from_the_settings(monkeypatch):
    monkeypatch.setenv("TAILORD_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("TAILORD_HTTP_PORT", "9123")
    monkeypatch.setenv("TAILORD_ADMIN_TOKEN", "from-env")
    assert resolve_endpoint(None, None, None) == ("http://127.0.0.1:9123", "from-env")
    assert resolve_endpoint("http://localhost:9123/", None, None) == ("http://localhost:9123", "from-env")
    with pytest.raises(UsageError, match="--token-file"):  # the env token only goes to the configured daemon
        resolve_endpoint("http://h:1/", None, None)
    assert resolve_endpoint("http://h:1", "given", None) == ("http://h:1", "given")


def test_summary_line_says_what_was_chosen_why_what_was_retrieved_and_whether_it_helped():
    result = {"name": "snap-1", "path": "/out", "strategy": "route+sept", "chosen_experience": 2,
              "chosen_experience_info": {"name": "fashion"}, "sept_steps": 12, "retrieved_count": 300,
              "target_count": 40,
              "candidates": [{"experience": 2, "vote_share": 0.7, "knn_accuracy": 0.85},
                             {"experience": 1, "vote_share": 0.3, "knn_accuracy": 0.6}],
              "retrieved_by_experience": {"2": 250, "1": 50},
              "label_check": {"snapshot_knn": 0.9, "latest_knn": 0.8}}
    assert summary_line(result) == (
        "snapshot snap-1: experience 2 (fashion), 70% of the routing votes, labelled kNN 0.85; SEPT 12 steps "
        "on your 40 images and 300 retrieved samples (exp 1: 50, exp 2: 250); on your labelled images kNN 0.90 vs latest "
        "checkpoint 0.80 -> /out")
    lagging = {**result, "label_check": None, "rerank": {"index_encoder": 1, "reranked_by": 2, "pool": 4800}}
    assert summary_line(lagging).endswith(
        "300 retrieved samples (exp 1: 50, exp 2: 250), picked from 4800 by experience 2's encoder (the index "
        "was at 1) -> /out")
    unlike = {**result, "label_check": None, "retrieved_count": 3, "retrieved_by_experience": {"2": 3},
              "relevance": {"k": 5, "retrieved": 64, "kept": 3}}
    assert summary_line(unlike).endswith(
        "3 retrieved samples (exp 2: 3), kept 3 of the 64 nearest (the others are further from your images than "
        "your images are from each other, k=5) -> /out")
    alone = {**unlike, "retrieved_count": 0, "retrieved_by_experience": {}, "relevance": {"k": 5, "retrieved": 64,
                                                                                       "kept": 0}}
    assert "SEPT 12 steps on your 40 images and 0 retrieved samples, kept 0 of the 64" in summary_line(alone)
    plain = {**result, "chosen_experience_info": None, "retrieved_count": 0, "label_check": None, "sept_steps": 0,
             "candidates": [{"experience": 2, "vote_share": 0.7}]}
    assert summary_line(plain) == "snapshot snap-1: experience 2, 70% of the routing votes -> /out"
    newest = {**result, "strategy": "sept", "chosen_experience": 3, "chosen_experience_info": {"name": "photos"}}
    assert summary_line(newest).startswith(
        "snapshot snap-1: experience 3 (photos), the newest checkpoint; your images resemble experience 2 (70% of "
        "the routing votes); SEPT 12 steps")
