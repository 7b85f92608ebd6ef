"""The GPU figures in one command: bare step, daemon end to end, ratio, utilization, routing.

On a machine with one CUDA GPU it runs, each as its own process with a time limit so the
whole check stays within ~10 minutes:

1. `train_step.py --preset gpu`: the bare train step (ResNet-50, 224 px) in images/s;
2. `stream_efficiency.py --preset gpu --photos` twice, JPEGs decoded by Pillow on the host
   (`--jpeg-decode cpu`) and by nvJPEG (`gpu`): the daemon's images/s through the real
   broker, its ratio to the bare step and the GPU's mean utilization while it trains;
3. `routing_latency.py --threads 1 --gpu`: route latency p50/p95 on 100k vectors with the
   daemon's FAISS thread setting, on FAISS's GPU copies when faiss has GPU support.

It prints one JSON line (each part's own JSON under its name, or its error) and exits 0.
Without CUDA it prints `{"skipped": ...}` and exits 0, so it is safe anywhere:

    make gpu-check          # or: .venv/bin/python benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def parts(images_per_domain: int) -> dict[str, tuple[list[str], int]]:
    """Each measurement: its benchmark command line and its time limit in seconds."""
    stream = ["stream_efficiency.py", "--preset", "gpu", "--photos", "--device", "cuda",
              "--batch-size", "256", "--decode-workers", "4", "--bare-steps", "30",
              "--images-per-domain", str(images_per_domain)]
    return {
        "bare_step": (["train_step.py", "--preset", "gpu", "--device", "cuda", "--steps", "30",
                       "--warmup", "5", "--no-baseline"], 120),
        "daemon_pillow": ([*stream, "--jpeg-decode", "cpu"], 200),
        "daemon_nvjpeg": ([*stream, "--jpeg-decode", "gpu"], 200),
        "routing": (["routing_latency.py", "--threads", "1", "--gpu"], 60),
    }


def last_json(text: str) -> dict | None:
    """The last line of `text` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def run_part(command: list[str], limit_s: int) -> dict:
    """One benchmark's JSON, or {"error": ...} when it fails or runs past `limit_s`."""
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True,
                              text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past its {limit_s} s limit"}
    result = last_json(proc.stdout) if proc.returncode == 0 else None
    if result is None:
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}"}
    return {**result, "wall_s": round(time.monotonic() - started, 1)}


def summary(results: dict[str, dict]) -> dict:
    """The headline figures: each daemon run's images/s and ratio, utilization, route p50."""
    out: dict = {"bare_step_images_per_second": results["bare_step"].get("images_per_second")}
    for name in ("daemon_pillow", "daemon_nvjpeg"):
        run = results[name]
        out[name] = {"images_per_second": run.get("daemon_images_per_second"), "ratio": run.get("ratio"),
                     "gpu_utilization_mean_percent": run.get("daemon", {}).get("gpu_utilization_mean_percent")}
    out["route_p50_ms"] = {kind: results["routing"].get(kind, {}).get("p50_ms") for kind in ("flat", "ivf")}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-domain", type=int, default=6000,
                        help="photos streamed per daemon run is twice this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_check", "skipped": "no CUDA device on this machine: "
                          "run it where `torch.cuda.is_available()` is true"}))
        return 0
    results = {name: run_part(command, limit) for name, (command, limit) in parts(args.images_per_domain).items()}
    print(json.dumps({"benchmark": "gpu_check", "device": torch.cuda.get_device_name(0),
                      "summary": summary(results), "parts": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
