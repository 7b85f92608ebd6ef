"""Soak: run the daemon for a while on an endless built-in stream, request snapshots now and
then, and watch memory, file descriptors, throughput, lag and the store/buffer budgets.

A producer thread keeps publishing the built-in domains (each pass under a new domain name,
so sample ids are new and the store's byte budget is exercised). The last line printed is one
JSON object: the samples over time and a summary (RSS growth between the second and the last
quarter of the run: a plateau is a ratio near 1).

Run: `python benchmarks/soak.py --minutes 20` (default 20).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

TOKEN = "soak-token"


def proc_stats(pid: int) -> dict:
    """RSS (MiB) and open file descriptors of a process, from /proc."""
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return {"rss_mib": round(rss_kib / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def admin(url: str, path: str, body: bytes | None = None) -> dict:
    req = urllib.request.Request(url + path, data=body, headers={"Authorization": f"Bearer {TOKEN}",
                                                                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def keep_producing(bootstrap: str, topic: str, stop: threading.Event, per_pass: int,
                   ahead: Callable[[int], bool] | None = None) -> None:
    """Publish the built-in domains over and over, each pass with fresh sample ids; with `ahead`
    (images published so far -> True when far enough ahead of the daemon), wait while it holds."""
    from streamer.produce import produce

    rounds, published = 0, 0
    while not stop.is_set():
        for source in ("digits", "fashion", "textures", "photos"):
            while ahead is not None and ahead(published) and not stop.is_set():
                time.sleep(1)
            if stop.is_set():
                return
            published += produce(f"builtin:{source}", topic, bootstrap, f"{source}-r{rounds}", per_pass, batch=8,
                                 progress=False)
        rounds += 1


def daemon_setting(text: str) -> tuple[str, str]:
    """An argparse type for ``--set TAILORD_NAME=VALUE`` (a daemon setting for the run)."""
    name, equals, value = text.partition("=")
    if not equals or not name.startswith("TAILORD_"):
        raise argparse.ArgumentTypeError(f"--set takes TAILORD_NAME=VALUE, got {text!r}")
    return name, value


def daemon_env(bootstrap: str, topic: str, folder: Path, port: int, **settings: str) -> dict[str, str]:
    """The daemon's environment: this broker and topic, state and targets under `folder`, the HTTP
    port with the admin token, JSON logs, then `settings` (TAILORD_* names); no other TAILORD_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILORD_")}
    env.update({"TAILORD_BOOTSTRAP_SERVERS": bootstrap, "TAILORD_TOPIC": topic,
                "TAILORD_STATE_DIR": str(folder / "state"), "TAILORD_HTTP_PORT": str(port),
                "TAILORD_ADMIN_TOKEN": TOKEN, "TAILORD_TARGETS_DIR": str(folder / "targets"),
                "TAILORD_LOG_FORMAT": "json", **settings})
    return env


def write_targets(folder: Path, count: int, source: str = "builtin:fashion") -> None:
    """The first `count` images of `source`, as files in `folder` (a snapshot's target_path)."""
    from itertools import islice

    from streamer.sources import open_source

    folder.mkdir(parents=True, exist_ok=True)
    for item in islice(open_source(source).items, count):
        (folder / f"{item.key}.{item.fmt_ext}").write_bytes(item.encoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--sample-every", type=float, default=15, help="seconds between samples")
    parser.add_argument("--snapshot-every", type=float, default=180, help="seconds between snapshots")
    parser.add_argument("--per-pass", type=int, default=600, help="images per domain per producer pass")
    parser.add_argument("--store-max-bytes", type=int, default=8_000_000)
    parser.add_argument("--replay-max-images", type=int, default=1000)
    args = parser.parse_args()

    from streamer.broker import EmbeddedBroker, free_port

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        tmp_path = Path(tmp)
        write_targets(tmp_path / "targets" / "fashion", 40)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = daemon_env(broker.bootstrap, "soak", tmp_path, port,
                         TAILORD_EXPERIENCE_IMAGES="1500", TAILORD_STORE_MAX_BYTES=str(args.store_max_bytes),
                         TAILORD_REPLAY_MAX_IMAGES=str(args.replay_max_images), TAILORD_KEEP_EXPERIENCES="5",
                         TAILORD_CHECKPOINT_INTERVAL_S="60")
        stop = threading.Event()
        producer = threading.Thread(target=keep_producing, args=(broker.bootstrap, "soak", stop, args.per_pass),
                                    daemon=True)
        producer.start()
        log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - the child writes it
        daemon = subprocess.Popen([sys.executable, "-m", "deploy.cli", "run"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        samples, snapshots = [], []
        started = time.monotonic()
        next_snapshot = started + args.snapshot_every
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(args.sample_every)
                if daemon.poll() is not None:
                    raise SystemExit(f"daemon exited {daemon.returncode}")
                try:
                    status = admin(url, "/admin/status")
                except OSError:
                    continue
                samples.append({"t": round(time.monotonic() - started, 1), **proc_stats(daemon.pid),
                                "images_total": status["images_total"], "experience": status["experience"],
                                "lag": sum(status["lag"].values()), "store_bytes": (status["store"] or {}).get("bytes"),
                                "index_size": status["index_size"]})
                print(json.dumps(samples[-1]), file=sys.stderr)
                if time.monotonic() > next_snapshot and (status.get("encoder_version") or 0) >= 1:
                    t0 = time.monotonic()
                    result = admin(url, "/admin/snapshots", json.dumps(
                        {"target_path": str(tmp_path / "targets" / "fashion"), "strategy": "route+sept"}).encode())
                    snapshots.append({"t": samples[-1]["t"], "seconds": round(time.monotonic() - t0, 2),
                                      "chosen_experience": result.get("chosen_experience")})
                    next_snapshot = time.monotonic() + args.snapshot_every
        finally:
            stop.set()
            daemon.terminate()
            daemon.wait(timeout=120)
        quarter = max(1, len(samples) // 4)
        second, last = samples[quarter:2 * quarter] or samples, samples[-quarter:]
        rates = [(b["images_total"] - a["images_total"]) / (b["t"] - a["t"])
                 for a, b in zip(samples, samples[1:], strict=False)]
        print(json.dumps({
            "summary": {"minutes": args.minutes, "rss_mib_second_quarter": round(mean(second, "rss_mib"), 1),
                        "rss_mib_last_quarter": round(mean(last, "rss_mib"), 1),
                        "rss_growth_ratio": round(mean(last, "rss_mib") / mean(second, "rss_mib"), 3),
                        "fds_max": max(r["fds"] for r in samples), "fds_last": samples[-1]["fds"],
                        "images_per_second_mean": round(sum(rates) / max(1, len(rates)), 1),
                        "store_bytes_max": max(r["store_bytes"] or 0 for r in samples),
                        "store_max_bytes": args.store_max_bytes, "snapshots": len(snapshots),
                        "daemon_exit_code": daemon.returncode},
            "samples": samples, "snapshot_requests": snapshots}))


if __name__ == "__main__":
    main()
