"""SEPT's training (a checkpoint's SSL method continued on some images), in this process or
in a child process beside the daemon's training loop.

Why a child: on a thread of the daemon SEPT shares the loop's interpreter (its Python runs
under the same GIL), a torch thread count set on it also applies to threads started
meanwhile, and a nice value set on it stays on that thread for good. A child has its own interpreter, threads and priority,
and a crash in it fails one snapshot, not the daemon. Measured on 2 cores
(docs/snapshots.md, "Snapshots while the daemon trains"): training kept 0.79-0.84 of its
images/s with the child (1 thread) against 0.73-0.81 on a daemon thread, and the snapshot
took as long (39-61 s); the child costs an interpreter start (~3 s) per snapshot.

Usage::

    backbone, steps = continue_checkpoint(checkpoint_dir, images, "cpu")          # in process
    backbone, steps = continue_in_child(checkpoint_dir, images, "cpu", threads=1, niceness=0)
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deploy.checkpoints import MANIFEST
from deploy.indexer import read_checkpoint
from deploy.learner import trained_preset
from deploy.snapshot_errors import Unavailable
from learners.backbones import build_backbone
from learners.methods import build_method
from learners.sept import SEPT_EPOCHS, SEPT_MAX_STEPS, continue_pretraining, sept_step
from learners.snapshot import backbone_from_spec
from safefiles.publish import STAGING_PREFIX

IMAGES_FILE = "images.safetensors"  # the child's input: (N, 3, S, S) uint8
BACKBONE_FILE = "backbone.safetensors"  # its output: the trained backbone's state_dict
RESULT_FILE = "result.json"  # its output: {"steps": n}
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def continue_checkpoint(checkpoint_dir: Path, images: torch.Tensor, device: torch.device | str,
                        epochs: int = SEPT_EPOCHS, max_steps: int = SEPT_MAX_STEPS) -> tuple[nn.Module, int]:
    """SEPT's training: the checkpoint's SSL method continued on `images` (N, 3, S, S) uint8 at
    the daemon's effective lr and batch size; (backbone, steps done). Also what a user would do
    without retrieval: train on the target images alone (benchmarks/snapshot.py, `target-only`)."""
    state, manifest = read_checkpoint(checkpoint_dir)
    spec = manifest["backbone"]
    with torch.device("meta"):  # no weight init: it would draw from the global RNG; the checkpoint fills it
        method = build_method(manifest["method"], build_backbone(spec["name"], spec.get("kwargs", {})))
    method.load_state_dict(state, assign=True)
    preset = trained_preset(manifest)  # the daemon's effective lr and batch size
    step = sept_step(method, preset, manifest["input"], torch.device(device))
    steps = continue_pretraining(step, images, preset.batch_size, epochs, max_steps)
    return method.backbone.eval(), steps


def continue_in_child(checkpoint_dir: Path, images: torch.Tensor, device: torch.device | str,
                      epochs: int = SEPT_EPOCHS, max_steps: int = SEPT_MAX_STEPS, threads: int = 1,
                      niceness: int = 0, work_parent: Path | None = None) -> tuple[nn.Module, int]:
    """`continue_checkpoint` in a child process with `threads` torch threads at nice +`niceness`;
    the same result (same seeds). Unavailable when the child fails.

    The images go to the child through a folder under `work_parent` (the daemon: its private
    snapshots folder, whose `.tmp-*` leftovers a restart removes; None: the system's temp dir).
    """
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}sept-", dir=work_parent) as work:
        save_file({"images": images.contiguous().cpu()}, str(Path(work) / IMAGES_FILE))
        command = [sys.executable, "-m", "deploy.sept_child", str(checkpoint_dir), work, str(device),
                   str(epochs), str(max_steps), str(threads), str(niceness)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"SEPT's child process failed (exit {done.returncode}): {tail}")
        steps = json.loads((Path(work) / RESULT_FILE).read_text())["steps"]
        spec = json.loads((Path(checkpoint_dir) / MANIFEST).read_text())["backbone"]
        backbone = backbone_from_spec(spec, load_file(str(Path(work) / BACKBONE_FILE)), meta=True)
    return backbone.to(device).eval(), steps


def main(argv: list[str]) -> None:
    """The child: `python -m deploy.sept_child CHECKPOINT WORKDIR DEVICE EPOCHS MAX_STEPS THREADS NICENESS`."""
    checkpoint_dir, work, device, epochs, max_steps, threads, niceness = argv
    die_with_parent()
    os.nice(int(niceness))
    torch.set_num_threads(int(threads))
    images = load_file(str(Path(work) / IMAGES_FILE))["images"]
    backbone, steps = continue_checkpoint(Path(checkpoint_dir), images, device, int(epochs), int(max_steps))
    state = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    save_file(state, str(Path(work) / BACKBONE_FILE))
    (Path(work) / RESULT_FILE).write_text(json.dumps({"steps": steps}))


def die_with_parent() -> None:
    """Linux: be sent SIGTERM when the daemon thread that started this child ends (a daemon that
    exits mid-snapshot leaves no SEPT running); elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
