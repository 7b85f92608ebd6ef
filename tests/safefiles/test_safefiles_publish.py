"""safefiles.publish: staged directories, manifests, pointer flips and verification, with crashes."""

import hashlib
import json

import pytest

from safefiles import publish
from safefiles.publish import (
    clean_staging,
    first_mismatch,
    flip_pointer,
    publish_dir,
    read_pointer,
    staging_dir,
    sync_tree,
)


class Crash(Exception):
    """A crash simulated in the middle of a publication."""


def _publish(root, name, payload, **kwargs):
    with staging_dir(root, name) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(payload)
        digests = sync_tree(tmp)
        publish_dir(tmp, root / name, json.dumps({"files": digests}).encode(), **kwargs)
    flip_pointer(root / "LATEST", name)
    return digests


def test_publish_then_verify(tmp_path):
    digests = _publish(tmp_path, "v1", b"payload")
    assert digests == {"sub/a.bin": hashlib.sha256(b"payload").hexdigest()}
    assert read_pointer(tmp_path / "LATEST") == "v1"
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert first_mismatch(tmp_path / "v1", manifest["files"]) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "v1"]


def test_first_mismatch_names_a_torn_or_missing_file(tmp_path):
    digests = _publish(tmp_path, "v1", b"payload")
    (tmp_path / "v1" / "sub" / "a.bin").write_bytes(b"paylo")
    assert first_mismatch(tmp_path / "v1", digests) == "sub/a.bin"
    assert first_mismatch(tmp_path / "v1", digests, sizes={"sub/a.bin": 5}) == "sub/a.bin"
    assert first_mismatch(tmp_path / "v1", {"gone": "0" * 64}) == "gone"


def test_crash_while_staging_keeps_old_publication_and_pointer(tmp_path):
    _publish(tmp_path, "v1", b"one")
    with pytest.raises(Crash), staging_dir(tmp_path, "v2") as tmp:
        (tmp / "half").write_bytes(b"torn")
        raise Crash
    assert read_pointer(tmp_path / "LATEST") == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "v1"]


def test_crash_before_rename_leaves_only_a_staging_leftover(tmp_path, monkeypatch):
    _publish(tmp_path, "v1", b"one")

    def crash(*_):
        raise Crash

    tmp = tmp_path / ".tmp-v2-leftover"
    tmp.mkdir()
    (tmp / "a").write_bytes(b"two")
    monkeypatch.setattr(publish.os, "rename", crash)
    with pytest.raises(Crash):
        publish_dir(tmp, tmp_path / "v2", b"{}")
    assert read_pointer(tmp_path / "LATEST") == "v1"
    assert not (tmp_path / "v2").exists()
    clean_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "v1"]


def test_crash_during_pointer_flip_keeps_old_pointer(tmp_path, monkeypatch):
    _publish(tmp_path, "v1", b"one")

    def crash(*_):
        raise Crash

    monkeypatch.setattr("safefiles.files.os.replace", crash)
    with pytest.raises(Crash):
        _publish(tmp_path, "v2", b"two")
    assert read_pointer(tmp_path / "LATEST") == "v1"
    assert (tmp_path / "v2" / "manifest.json").is_file()  # published, just not pointed at


def test_publish_refuses_an_existing_directory_unless_replace(tmp_path):
    _publish(tmp_path, "v1", b"one")
    with pytest.raises(FileExistsError):
        _publish(tmp_path, "v1", b"two")
    assert (tmp_path / "v1" / "sub" / "a.bin").read_bytes() == b"one"
    clean_staging(tmp_path)
    _publish(tmp_path, "v1", b"two", replace=True)
    assert (tmp_path / "v1" / "sub" / "a.bin").read_bytes() == b"two"


def test_staging_mode_and_missing_pointer(tmp_path):
    with staging_dir(tmp_path / "new", "x", mode=0o700) as tmp:
        assert tmp.stat().st_mode & 0o777 == 0o700
        assert tmp.name.startswith(".tmp-x-")
    assert read_pointer(tmp_path / "CURRENT") is None
