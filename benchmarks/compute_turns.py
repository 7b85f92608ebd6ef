"""The training step beside the indexer's embedding on the same CPU cores: at the same time, or in turns.

The daemon's two torch jobs on rank 0, without the broker: the main thread runs the
daemon's train step (`cpu` preset, stream + replay halves) for `--seconds`; a second thread
embeds 256-image chunks with a frozen copy of the backbone (as `deploy/indexer.py` does)
whenever its charged seconds are below `--share` of the step's seconds
(`deploy.index_budget.ComputeBudget`). Arms, each in a fresh process, alternating:
`alone` (no indexer), `beside` (both threads at once, the daemon before
`deploy/compute_turns.py`) and `turns` (one at a time, `ComputeTurns`).

Reported per arm: training images/s over the wall time, the step's own images/s, the
indexer's embeddings per second of wall time and per second charged, and the charged share.
The last line printed is one JSON object. Run: `python benchmarks/compute_turns.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the daemon sets it (deploy/__init__.py)
import torch  # noqa: E402 - after the OpenMP policy

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("alone", "beside", "turns")
CHUNK = 256  # deploy.indexer.EMBED_BATCH


def run_arm(arm: str, seconds: float, share: float, method_name: str) -> dict:
    """One arm in this process: train for `seconds` with (or without) the indexer thread."""
    from benchmarks.stream_efficiency import daemon_step
    from deploy.compute_turns import ComputeTurns
    from deploy.index_budget import POLL_S, ComputeBudget
    from learners.augment import EvalTransform
    from learners.evaluation import embed
    from learners.presets import PRESETS

    preset = PRESETS["cpu"]
    step, stream, replay = daemon_step(preset.name, method_name, preset.batch_size, "cpu")
    side = preset.resolution
    stored = torch.randint(0, 256, (CHUNK, 3, side, side), dtype=torch.uint8)  # one indexer chunk
    frozen, transform = copy.deepcopy(step.method.backbone), EvalTransform(side)
    turns = ComputeTurns(enabled=arm == "turns")
    budget = ComputeBudget(share, turns=turns)
    embedded, stop = [0], threading.Event()

    def indexer() -> None:
        while not stop.is_set():
            if not budget.allows():
                time.sleep(POLL_S)
                continue
            with budget.turns:
                started = time.perf_counter()
                embed(frozen, stored, transform)
                budget.spent("embed", time.perf_counter() - started)
            embedded[0] += CHUNK

    for _ in range(3):
        step(stream, replay)
    budget.trained(0.0)  # training runs from the start: the share binds (a busy daemon)
    thread = threading.Thread(target=indexer, daemon=True)
    if arm != "alone":
        thread.start()
    images, step_seconds, started = 0, 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        with turns:
            result = step(stream, replay)
        budget.trained(result.seconds)
        step_seconds += result.seconds
        images += preset.batch_size
    wall = time.perf_counter() - started
    stop.set()
    if thread.is_alive():
        thread.join()  # a thread still in torch ops at exit aborts the process
    charged = budget.seconds["embed"]
    return {"arm": arm, "train_images_per_second": round(images / wall, 1),
            "step_images_per_second": round(images / step_seconds, 1),
            "embedded_per_second": round(embedded[0] / wall, 1),
            "embedded_per_charged_second": round(embedded[0] / charged, 1) if charged else None,
            "charged_share": round(charged / step_seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="training time per arm")
    parser.add_argument("--share", type=float, default=0.10, help="the indexer's share (TAILORD_INDEXER_SHARE)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the three arms")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in a child process
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.seconds, args.share, args.method)))
        return
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for _ in range(args.rounds):
        for arm in ARMS:
            out = subprocess.run([sys.executable, __file__, "--arm", arm, "--seconds", str(args.seconds),
                                  "--share", str(args.share), "--method", args.method],
                                 check=True, capture_output=True, text=True).stdout
            runs[arm].append(json.loads(out.splitlines()[-1]))
            print(out.strip(), file=sys.stderr, flush=True)
    keys = ("train_images_per_second", "step_images_per_second", "embedded_per_second",
            "embedded_per_charged_second", "charged_share")
    summary = {arm: {k: round(statistics.mean(r[k] for r in rs), 3) if rs[0][k] is not None else None for k in keys}
               for arm, rs in runs.items()}
    alone = summary["alone"]["train_images_per_second"]
    for arm in ("beside", "turns"):
        summary[arm]["train_vs_alone"] = round(summary[arm]["train_images_per_second"] / alone, 3)
    print(json.dumps({"arms": summary, "runs": runs, "config": {**vars(args), "threads": torch.get_num_threads(),
                                                               "loadavg_1m": round(os.getloadavg()[0], 2)}}))


if __name__ == "__main__":
    main()
