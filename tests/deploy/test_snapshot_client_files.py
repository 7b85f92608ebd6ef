"""`tailord snapshot --out`: downloaded files never write through a symlink planted in the folder."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from deploy.snapshot_client import _write_file


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


def test_a_planted_part_symlink_is_not_followed(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".model.safetensors.part").symlink_to(victim)  # the old fixed temporary name
    _write_file(out / "model.safetensors", b"weights")
    assert victim.read_text() == "precious"
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert not any(p.name.endswith(".part") and not p.is_symlink() for p in out.iterdir())


def test_a_symlink_at_the_destination_is_replaced_not_followed(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").symlink_to(victim)
    _write_file(out / "manifest.json", b"{}")
    assert victim.read_text() == "precious"
    mode = (out / "manifest.json").lstat().st_mode
    assert stat.S_ISREG(mode) and (out / "manifest.json").read_bytes() == b"{}"


def test_a_failed_write_leaves_no_part_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def refuse(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safefiles.files.os.replace", refuse)
    with pytest.raises(OSError):
        _write_file(out / "model.safetensors", b"weights")
    assert list(out.iterdir()) == []
