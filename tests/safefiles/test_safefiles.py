"""safefiles.files: fsynced atomic writes, exclusive create and sha256, with simulated crashes."""

import hashlib
import os

import pytest

from safefiles import files
from safefiles.files import file_matches, sha256_file, write_atomic, write_exclusive, write_synced


class Crash(Exception):
    """A crash simulated in the middle of a write."""


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "LATEST"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["LATEST"]


def test_write_atomic_crash_before_rename_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_atomic(target, b"old")

    def crash(*_):
        raise Crash

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(Crash):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_write_atomic_crash_during_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_atomic(target, b"old")

    def crash(_fd):
        raise Crash

    monkeypatch.setattr(files.os, "fsync", crash)
    with pytest.raises(Crash):
        write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old"


def test_write_exclusive_mode_and_replaces_symlink_without_following(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "token"
    link.symlink_to(victim)
    write_exclusive(link, b"secret", mode=0o600)
    assert victim.read_bytes() == b"keep"
    assert not link.is_symlink() and link.read_bytes() == b"secret"
    assert link.stat().st_mode & 0o777 == 0o600


def test_write_exclusive_crash_removes_temporary(tmp_path, monkeypatch):
    def crash(*_):
        raise Crash

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(Crash):
        write_exclusive(tmp_path / "out", b"data")
    assert list(tmp_path.iterdir()) == []


def test_sha256_file_matches_hashlib_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHUNK", 7)
    data = os.urandom(100)
    path = tmp_path / "blob"
    write_synced(path, data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_file_matches_checks_size_digest_and_absence(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert file_matches(path, digest)
    assert file_matches(path, digest, size=3)
    assert not file_matches(path, digest, size=4)
    assert not file_matches(path, "0" * 64)
    assert not file_matches(tmp_path / "missing", digest)
