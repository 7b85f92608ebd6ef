"""JSON snapshot requests naming a folder under TAILORD_TARGETS_DIR: bounded reads that stay inside it."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

import deploy.snapshot_request as snapshot_request
from deploy.http_api import error_status
from deploy.snapshot_errors import SnapshotError
from deploy.snapshot_request import collect_images, parse_request, read_bounded


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def targets(tmp_path):
    base = tmp_path / "targets"
    (base / "task").mkdir(parents=True)
    for i in range(3):
        (base / "task" / f"{i}.png").write_bytes(png(40 * i))
    (base / "labels.csv").write_text("filename,label\n0.png,a\n1.png,b\n2.png,a\n")
    return base


def parse_json(base, body: bytes) -> snapshot_request.SnapshotRequest:
    return parse_request("application/json", body, base)


def request(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_a_folder_request_reads_its_images_and_labels(targets):
    parsed = parse_json(targets, request({"target_path": "task", "labels_path": "labels.csv"}))
    assert [name for name, _ in parsed.targets] == ["0.png", "1.png", "2.png"]
    assert parsed.labels == {"0.png": "a", "1.png": "b", "2.png": "a"}
    assert parsed.epochs == 10  # SEPT_EPOCHS when the request does not say


def test_a_folder_request_may_set_septs_epochs(targets, monkeypatch):
    assert parse_json(targets, request({"target_path": "task", "epochs": 25})).epochs == 25

    def unread(*_):
        raise AssertionError("a target was read before the request's fields were checked")

    monkeypatch.setattr(snapshot_request, "_read_targets", unread)
    for bad in ({"epochs": 0}, {"budget": 0}, {"strategy": "bogus"}, {"name": 3}):
        with pytest.raises(SnapshotError) as err:
            parse_json(targets, request({"target_path": "task", **bad}))
        assert error_status(err.value) == 400


def test_the_images_of_one_request_are_capped_in_total(targets, monkeypatch):
    one = len(png(0))
    monkeypatch.setattr(snapshot_request, "TARGETS_MAX_BYTES", 2 * one + 10)
    with pytest.raises(SnapshotError, match="in all") as error:
        parse_json(targets, request({"target_path": "task"}))
    assert error_status(error.value) == 400


def test_the_labels_file_is_read_with_a_limit(targets, monkeypatch):
    monkeypatch.setattr(snapshot_request, "LABELS_MAX_BYTES", 16)
    with pytest.raises(SnapshotError, match="labels file 'labels.csv' is over 16 bytes"):
        parse_json(targets, request({"target_path": "task", "labels_path": "labels.csv"}))


def test_an_entry_leading_outside_is_skipped_before_it_is_opened(targets, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(png(9))  # a readable image outside TAILORD_TARGETS_DIR
    (targets / "task" / "leak.png").symlink_to(secret)
    (targets / "task" / "noext").symlink_to(secret)
    assert [p.name for p in collect_images(targets / "task", base=targets)] == ["0.png", "1.png", "2.png"]


def test_a_symlink_is_never_read_through(targets, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(1))
    link = targets / "task" / "link.png"
    link.symlink_to(outside)
    with pytest.raises(SnapshotError, match="cannot be read"):
        read_bounded(link, 1 << 20, "target")
    assert read_bounded(targets / "task" / "0.png", 1 << 20, "target") == png(0)
