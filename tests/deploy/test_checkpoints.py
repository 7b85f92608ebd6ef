"""Checkpoints: atomic writes, manifest verification, fallback past a torn checkpoint."""

import json

import pytest

from deploy.checkpoints import clean_temporaries, load_latest, verify, write_checkpoint


def _write(root, name, payload: bytes):
    return write_checkpoint(root, name, {"model.bin": lambda p: p.write_bytes(payload),
                                         "sub/extra.txt": lambda p: p.write_text(name)}, {"kind": "test"})


def test_roundtrip_and_latest(tmp_path):
    _write(tmp_path, "exp-000001", b"one")
    ckpt = _write(tmp_path, "exp-000002", b"two")
    assert (tmp_path / "LATEST").read_text() == "exp-000002"
    loaded = load_latest(tmp_path)
    assert loaded.path == ckpt.path
    assert set(loaded.manifest["files"]) == {"model.bin", "sub/extra.txt"}
    assert (loaded.path / "model.bin").read_bytes() == b"two"


def test_corrupt_latest_falls_back(tmp_path):
    _write(tmp_path, "exp-000001", b"one")
    ckpt = _write(tmp_path, "exp-000002", b"two")
    (ckpt.path / "model.bin").write_bytes(b"twX")  # flipped byte
    assert verify(ckpt.path) is None
    assert load_latest(tmp_path).name == "exp-000001"


def test_missing_file_and_bad_manifest_fall_back(tmp_path):
    _write(tmp_path, "exp-000001", b"one")
    ckpt = _write(tmp_path, "exp-000002", b"two")
    (ckpt.path / "sub" / "extra.txt").unlink()
    assert load_latest(tmp_path).name == "exp-000001"
    ckpt3 = _write(tmp_path, "exp-000003", b"three")
    (ckpt3.path / "manifest.json").write_text("{not json")
    assert load_latest(tmp_path).name == "exp-000001"


def test_failed_write_leaves_previous(tmp_path):
    _write(tmp_path, "exp-000001", b"one")

    def boom(path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_checkpoint(tmp_path, "exp-000002", {"model.bin": boom}, {})
    assert not (tmp_path / "exp-000002").exists()
    assert list(tmp_path.glob(".tmp-*")) == []
    assert load_latest(tmp_path).name == "exp-000001"


def test_crash_leftovers_cleaned(tmp_path):
    _write(tmp_path, "exp-000001", b"one")
    torn = tmp_path / ".tmp-exp-000002-123"
    torn.mkdir()
    (torn / "model.bin").write_bytes(b"half")
    assert load_latest(tmp_path).name == "exp-000001"
    clean_temporaries(tmp_path)
    assert not torn.exists()


def test_manifest_has_hashes(tmp_path):
    ckpt = _write(tmp_path, "exp-000001", b"one")
    manifest = json.loads((ckpt.path / "manifest.json").read_text())
    assert len(manifest["files"]["model.bin"]) == 64
    assert manifest["kind"] == "test"
