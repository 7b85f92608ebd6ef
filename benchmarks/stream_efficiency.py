"""Daemon throughput through the real broker vs the bare train step, same model and batch.

1. bare: `TrainStep` on tensors already in memory (stream part + replay part, as the daemon),
   before and after the daemon run (the ratio is against their mean).
2. daemon: an embedded broker is filled with real images first, then `tailord run` consumes
   them (decode, prefetch, probes, replay, experience ends, checkpoints) and exits when idle;
   its own log reports images through the step and the seconds from first to last step.

With `--nproc N` the daemon runs as N DDP ranks (torchrun, gloo on CPU) on an N-partition
topic, each rank with cores / N torch threads; rank 0's report is the whole world's.

The last line printed is one JSON object. Run: `python benchmarks/stream_efficiency.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the daemon sets it (deploy/__init__.py): the bare step too
import torch  # noqa: E402 - after the OpenMP policy

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.soak import daemon_setting  # noqa: E402  the --set parser live_snapshot uses too


def daemon_step(preset_name: str, method: str, batch_size: int, device: str) -> tuple:
    """The daemon's train step for the preset's model (seed 0) and a batch of random images as the
    daemon feeds it: (TrainStep, stream half (B/2,3,S,S) uint8, replay half (B-B/2,3,S,S) uint8)."""
    from learners.augment import BatchAugment
    from learners.backbones import build_backbone
    from learners.device import pick_device
    from learners.methods import build_method
    from learners.presets import PRESETS
    from learners.train_step import TrainStep, build_optimizer

    torch.manual_seed(0)
    dev = pick_device(device)
    preset = PRESETS[preset_name]
    model = build_method(method, build_backbone(preset.backbone, preset.backbone_kwargs)).to(dev)  # the preset's, as the daemon
    step = TrainStep(model, BatchAugment(preset.resolution).to(dev), build_optimizer(model, preset), dev,
                     amp=dev.type == "cuda", channels_last=True)
    half = batch_size // 2
    images = torch.randint(0, 256, (half, 3, preset.resolution, preset.resolution), dtype=torch.uint8)
    replay = torch.randint(0, 256, (batch_size - half, 3, preset.resolution, preset.resolution), dtype=torch.uint8)
    return step, images, replay


def bare_images_per_second(preset_name: str, method: str, batch_size: int, steps: int, device: str) -> float:
    """Images/s of the train step alone (the daemon's batch: stream + replay images)."""
    step, images, replay = daemon_step(preset_name, method, batch_size, device)
    for _ in range(3):
        step(images, replay)
    started = time.perf_counter()
    for _ in range(steps):
        step(images, replay)
    return steps * batch_size / (time.perf_counter() - started)


def write_photo_jpegs(folder: Path, count: int, side: int = 256) -> Path:
    """`count` JPEG crops (side x side, quality 90) of scikit-image's sample photos: a stream
    whose decode cost is that of real camera images, for the 224 px GPU preset."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = [np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
              for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        crop = rng.integers(side // 2, min(photo.shape[:2]) + 1)
        y, x = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop + 1)
        image = Image.fromarray(photo[y:y + crop, x:x + crop]).resize((side, side), Image.BILINEAR)
        image.save(folder / f"photo-{i:06d}.jpg", quality=90)
    return folder


class GpuUtilization:
    """Samples `nvidia-smi` GPU utilization (%) every 500 ms while open; `mean` is None without
    a GPU or nvidia-smi."""

    def __enter__(self) -> GpuUtilization:
        self.samples: list[float] = []
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) if torch.cuda.is_available() else None
        except OSError:
            self._proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.samples = [float(line.split(",")[0]) for line in out.splitlines() if line.strip()]

    @property
    def mean(self) -> float | None:
        """Mean utilization from the first to the last busy sample (start-up and exit left out)."""
        busy = [i for i, value in enumerate(self.samples) if value > 0]
        if not busy:
            return None
        window = self.samples[busy[0]: busy[-1] + 1]
        return round(sum(window) / len(window), 1)


def daemon_run(images_per_domain: int, preset: str, method: str, batch_size: int, device: str,
               experience_images: int, photos: bool, decode_workers: int, nproc: int = 1,
               jpeg_decode: str = "auto", daemon_log: str | None = None,
               extra_env: dict[str, str] | None = None) -> dict:
    """Fill a broker, run the daemon over it until idle, return its own throughput report."""
    from streamer.broker import EmbeddedBroker
    from streamer.produce import produce
    from streamer.topics import ensure_topic

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        topic = "bench"
        ensure_topic(broker.bootstrap, topic, nproc)  # records are keyed by sample id: spread evenly
        sources = [str(write_photo_jpegs(Path(tmp) / "photos", 2 * images_per_domain))] if photos else \
            ["builtin:digits", "builtin:fashion"]
        for source in sources:
            produce(source, topic, broker.bootstrap, None, images_per_domain * (2 if photos else 1), batch=16,
                    progress=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAILORD_")}
        env.update({"TAILORD_BOOTSTRAP_SERVERS": broker.bootstrap, "TAILORD_TOPIC": topic,
                    "TAILORD_STATE_DIR": str(Path(tmp) / "state"), "TAILORD_HTTP_PORT": "0",
                    "TAILORD_PRESET": preset, "TAILORD_METHOD": method, "TAILORD_BATCH_SIZE": str(batch_size),
                    "TAILORD_DEVICE": device, "TAILORD_EXPERIENCE_IMAGES": str(experience_images),
                    "TAILORD_EXIT_WHEN_IDLE_S": "3", "TAILORD_LOG_FORMAT": "json",
                    "TAILORD_DECODE_WORKERS": str(decode_workers), "TAILORD_JPEG_DECODE": jpeg_decode})
        env.update(extra_env or {})
        if nproc > 1:
            env["TAILORD_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        with GpuUtilization() as gpu:
            proc = subprocess.run([sys.executable, "-m", "deploy.cli", "run", "--nproc", str(nproc)], env=env,
                                  capture_output=True, text=True, timeout=3600)
        if daemon_log is not None:
            Path(daemon_log).write_text(proc.stderr)
        events = json_events(proc.stderr)
        stopped = [e for e in events if e.get("event") == "stopped" and e.get("rank", 0) == 0]
        if proc.returncode != 0 or not stopped:
            raise SystemExit(f"daemon failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        checkpoints = [e for e in events if e.get("event") == "checkpoint"]
        return {"images_per_second": stopped[-1]["images_per_second_overall"],
                "images_stepped": stopped[-1]["images_stepped"], "train_seconds": stopped[-1]["train_seconds"],
                "input_wait_seconds": stopped[-1]["input_wait_seconds"],
                "step_seconds": stopped[-1]["step_seconds"],  # the rest of train_seconds is the loop's own work
                "loop_seconds": round(stopped[-1]["train_seconds"] - stopped[-1]["input_wait_seconds"]
                                      - stopped[-1]["step_seconds"], 3),
                "gpu_utilization_mean_percent": gpu.mean,
                "stream_images_trained": stopped[-1]["images_total"], "checkpoints": len(checkpoints),
                "checkpoint_seconds": round(sum(e["seconds"] for e in checkpoints), 3),
                "index": index_freshness(events)}


def index_freshness(events: list[dict]) -> dict:
    """How fresh the live index was while the daemon trained, from its log: each refresh's delay
    after its experience checkpoint, and at the last step (the idle exit's start) how many
    experience checkpoints the live index lagged and since when (docs/design.md, "Freshness
    guarantee"; refreshes after the last step ran with the budget lifted)."""
    def at(event: dict) -> datetime:
        return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))

    written = {int(e["checkpoint"].removeprefix("exp-")): at(e) for e in events
               if e.get("event") == "checkpoint" and e.get("kind") == "experience"}
    refreshed = {e["encoder_version"]: at(e) for e in events if e.get("event") == "index_refreshed"}
    idle = [e for e in events if e.get("event") == "idle_exit"]
    if not idle:
        return {}
    last_step = at(idle[-1]) - timedelta(seconds=idle[-1]["idle_seconds"])
    live = max((v for v, t in refreshed.items() if t <= last_step), default=0)
    newer = sorted(t for v, t in written.items() if v > live and t <= last_step)
    return {"refresh_seconds_after_checkpoint": {str(v): round((t - written[v]).total_seconds(), 1)
                                                 for v, t in sorted(refreshed.items()) if v in written},
            "versions_behind_at_last_step": len(newer),
            "stale_seconds_at_last_step": round((last_step - newer[0]).total_seconds(), 1) if newer else 0.0}


def json_events(text: str) -> list[dict]:
    """The JSON log lines of `text` (torchrun may prefix a rank tag to each line)."""
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line[line.index("{"):]))
        except ValueError:
            continue
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images-per-domain", type=int, default=2500)
    parser.add_argument("--experience-images", type=int, default=2000)
    parser.add_argument("--bare-steps", type=int, default=60)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--photos", action="store_true", help="stream 256 px JPEG photo crops (GPU preset)")
    parser.add_argument("--decode-workers", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1, help="DDP ranks for the daemon run (torchrun)")
    parser.add_argument("--jpeg-decode", choices=["auto", "cpu", "gpu"], default="auto",
                        help="TAILORD_JPEG_DECODE: gpu = batched nvJPEG (auto picks it on CUDA)")
    parser.add_argument("--set", action="append", default=[], type=daemon_setting, metavar="TAILORD_X=VALUE",
                        help="a daemon setting for the run (repeatable), e.g. TAILORD_EVALUATION_SHARE=0.2")
    parser.add_argument("--daemon-log", help="write the daemon's JSON log here (to see what the time went to)")
    args = parser.parse_args()

    # the bare step before and after the daemon run: on a shared VM its speed drifts by a quarter or
    # more between minutes, so the ratio is against the mean of the two and both are reported
    before = bare_images_per_second(args.preset, args.method, args.batch_size, args.bare_steps, args.device)
    daemon = daemon_run(args.images_per_domain, args.preset, args.method, args.batch_size, args.device,
                        args.experience_images, args.photos, args.decode_workers, args.nproc, args.jpeg_decode,
                        args.daemon_log, dict(args.set))
    after = bare_images_per_second(args.preset, args.method, args.batch_size, args.bare_steps, args.device)
    bare = (before + after) / 2
    print(json.dumps({
        "daemon_images_per_second": daemon["images_per_second"],
        "bare_step_images_per_second": round(bare, 2),
        "bare_step_before_after": [round(before, 2), round(after, 2)],
        "ratio": round(daemon["images_per_second"] / bare, 3),
        "daemon": daemon,
        "config": {**vars(args), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                   "loadavg_1m": os.getloadavg()[0]},
    }))


if __name__ == "__main__":
    main()
