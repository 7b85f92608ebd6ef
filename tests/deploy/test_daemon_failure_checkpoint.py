"""A daemon that fails keeps what it trained if the failure came between iterations, and
writes nothing if it came in the middle of one (a checkpoint then could skip the batch being
trained or hold a half-applied update). Runs the real loop in-process on the embedded broker."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import pytest
import torch

import deploy.daemon as daemon
from deploy.checkpoints import load_latest
from deploy.settings import load_settings
from streamer.produce import produce
from tests.kafka_fixtures import unique_topic


@pytest.fixture
def run_daemon(broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Produce 64 digits and run the daemon loop here; returns (exit code, checkpoints folder)."""
    for name in [n for n in os.environ if n.startswith("TAILORD_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    topic = unique_topic("fail")
    produce("builtin:digits", topic, broker.bootstrap, limit=64)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()

    def run() -> tuple[int, Path]:
        settings = load_settings(bootstrap_servers=broker.bootstrap, topic=topic, state_dir=tmp_path / "state",
                                 preset="cpu", device="cpu", batch_size=8, resolution=16, probe_fraction=0.0,
                                 experience_images=100_000, http_port=0, exit_when_idle_s=30, torch_threads=1,
                                 admin_token="t", log_format="json")
        return daemon.run(settings), tmp_path / "state" / "checkpoints"

    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    torch.set_num_threads(threads)


def test_a_failure_between_iterations_still_checkpoints(run_daemon, monkeypatch) -> None:
    real, batches = daemon.batch_records, itertools.count(1)

    def fail_on_the_fourth_batch(samples):
        if samples and next(batches) == 4:
            raise RuntimeError("broker authorization revoked (simulated)")
        return real(samples)

    monkeypatch.setattr(daemon, "batch_records", fail_on_the_fourth_batch)
    code, checkpoints = run_daemon()
    assert code == 1
    saved = load_latest(checkpoints)
    assert saved is not None and saved.manifest["kind"] == "interval"
    progress = saved.manifest["progress"]
    assert progress["steps"] == 3 and progress["images_total"] > 0


def test_a_failure_inside_a_step_writes_no_checkpoint(run_daemon, monkeypatch) -> None:
    real_build, steps = daemon.build_learner, itertools.count(1)

    def learner_failing_on_the_third_step(*args, **kwargs):
        learner = real_build(*args, **kwargs)
        step = learner.step

        def failing(*args, **kwargs):
            if next(steps) == 3:
                raise RuntimeError("CUDA out of memory (simulated)")
            return step(*args, **kwargs)

        learner.step = failing
        return learner

    monkeypatch.setattr(daemon, "build_learner", learner_failing_on_the_third_step)
    code, checkpoints = run_daemon()
    assert code == 1
    assert load_latest(checkpoints) is None  # the offsets would cover a batch that was never trained
