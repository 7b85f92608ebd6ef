"""Disk pressure: a full state-dir filesystem fails checkpoints loudly, keeps the last good one,
and checkpoints again once space returns. Uses a real size-limited tmpfs (needs root)."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess

import pytest

from deploy.checkpoints import load_latest
from tests.e2e.daemon_proc import DaemonProcess
from tests.e2e.streams import metric, produce
from tests.kafka_fixtures import unique_topic

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FILLER = "filler.bin"


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    if not os.path.ismount(mount) or os.statvfs(mount).f_blocks * os.statvfs(mount).f_frsize > 64 * 2**20:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        pytest.skip("the tmpfs mount is not visible here (another mount namespace?)")
    (mount / FILLER).touch()  # its inode exists before the daemon can take the last byte
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path, leave_bytes: int) -> None:
    """Grow the filler file until only `leave_bytes` are free on path's filesystem
    (or none: the daemon may write the last bytes first, which is just as full)."""
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    with open(path / FILLER, "r+b") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave_bytes))
            fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def disk_use(path) -> str:
    """`du` of every entry under path, for a failure message."""
    return subprocess.run(["du", "-ak", str(path)], capture_output=True, text=True).stdout


def checkpoint_errors(text: str) -> float:
    return sum(float(v) for v in re.findall(r"^tailord_checkpoint_errors_total{[^}]*} (\S+)$", text, re.M))


def test_full_disk_keeps_last_good_checkpoint_and_recovers(broker, small_fs):
    topic = unique_topic("disk")
    produce(broker.bootstrap, topic, "builtin:digits", 600, batch=8)
    state = small_fs / "state"
    daemon = DaemonProcess(state, broker.bootstrap, topic, experience_images=100_000, batch_size=32,
                           checkpoint_interval_s=1, probe_fraction=0.1, store_max_bytes=4_000_000)
    daemon.log_path = small_fs.parent / "daemon.log"  # the log must not live on the full disk
    daemon.start()
    try:
        daemon.wait_for(lambda: load_latest(state / "checkpoints") is not None, 120, "a first checkpoint")
        fill(small_fs, leave_bytes=64 * 1024)
        good = load_latest(state / "checkpoints").name
        trained = metric(daemon.metrics(), "tailord_images_trained_total")
        daemon.wait_for(lambda: checkpoint_errors(daemon.metrics()) >= 1, 120, "a failed checkpoint")
        assert load_latest(state / "checkpoints") is not None, "the last good checkpoint must survive"
        assert any(e.get("event") == "checkpoint_failed" for e in daemon.logs())
        daemon.wait_for(lambda: metric(daemon.metrics(), "tailord_images_trained_total") > trained, 120,
                        "training to go on while the disk is full")

        (small_fs / FILLER).unlink()  # space returns
        daemon.wait_for(lambda: load_latest(state / "checkpoints").name != good, 120, "a new checkpoint")
        assert daemon.get("/healthz")[0] == 200
        assert daemon.stop(signal.SIGTERM) == 0
    except BaseException:
        print("disk use at the failure (KiB):\n" + disk_use(small_fs))  # pytest shows it with the failure
        raise
    finally:
        daemon.kill()
    assert load_latest(state / "checkpoints") is not None
