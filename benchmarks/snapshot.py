"""Task-tailored snapshots on a real multi-domain stream: accuracy, routing, retrieval, latency.

1. An embedded broker is filled with the built-in domains in order (digits -> fashion ->
   textures -> photos, ``--images-per-domain`` x ``--scale`` each) and ``tailord run``
   consumes them until idle (as ``benchmarks/stream_efficiency.py``). Experiences end at
   ``--experience-fraction`` of the images per domain or at a domain change, so the last
   domain too gets an end-of-experience checkpoint (the daemon does not close the last
   experience when it exits idle; a remnant after it has no checkpoint). The daemon exits
   after ``IDLE_EXIT_S`` without records, so the last experience's index refresh can finish.
2. Offline on the stopped daemon's state dir (``SnapshotEngine.open_offline``), for each
   domain a held-out target set is built from items the stream never used (the source's
   items after the first N): ``--shots`` labelled images for each of the first ``--classes``
   classes, and a disjoint test split (``--test-images``) of the same classes.
3. Arms, per domain: ``latest`` (the newest experience checkpoint's backbone), ``route``,
   ``sept`` and ``route+sept`` snapshots (the SEPT arms get the same ``--sept-epochs`` and
   the same retrieval budget, ``--budget-share`` of the stored samples). Each backbone
   embeds the few-shot set and the test split: weighted kNN (k=20, T=0.07) and a linear
   probe, trained on the few-shot features, scored on the test split.
4. Routing accuracy: the chosen experience's domain (``metrics/history.json`` records)
   equals the target set's domain. ``unlabelled`` (the vote alone; the target's metric):
   ``--routing-sets`` held-out sets per domain; ``labelled``: the ``route`` and
   ``route+sept`` arms, where the few-shot labels pick the best kNN candidate among the
   top votes (which may well be another domain's experience).
5. Latency: every ``create`` is timed; ``--route-repeats`` unlabelled ``route`` snapshots of
   ``--latency-targets`` images (embedding included, this small store); and the embed-free
   100k-vector route latency of ``benchmarks/routing_latency.py`` (run as a subprocess).
6. Index refresh seconds (the daemon's ``index_refreshed`` log events) and the training
   images/s in the daemon's throughput samples during refreshes vs elsewhere.

The last line printed is one JSON object. Run: ``python benchmarks/snapshot.py --device cpu``
(``--scale 0.5`` for a quicker look). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DOMAINS = ("digits", "fashion", "textures", "photos")
ARMS = ("latest", "route", "sept", "route+sept")
KNN_K, KNN_T = 20, 0.07
IDLE_EXIT_S = 20  # long enough for the last experience's index refresh to finish before the daemon exits
TARGETS = {"routing_accuracy_min": 0.95, "route_sept_gain_points_min": 5.0, "retrieved_share_max": 0.05,
           "route_p50_seconds_max": 1.0}


def say(message: str) -> None:
    """Progress line on stderr (stdout's last line is the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class TargetSet:
    """Held-out images of one domain: labelled few-shot targets, a test split, the rest."""

    domain: str
    shots: list[tuple[str, bytes, str]]  # (filename, encoded, label)
    test: list[tuple[bytes, str]]
    rest: list[bytes]


def held_out(domain: str, skip: int, shots: int, classes: int, test_images: int, rest_max: int) -> TargetSet:
    """Items of builtin `domain` after the first `skip` (the streamed ones), split for the benchmark."""
    from streamer.sources import open_source

    chosen: list[str] = []
    few: list[tuple[str, bytes, str]] = []
    test: list[tuple[bytes, str]] = []
    rest: list[bytes] = []
    per_class: Counter[str] = Counter()
    for i, item in enumerate(open_source(f"builtin:{domain}").items):
        if i < skip:
            continue
        label = str(item.label)
        if label not in chosen and len(chosen) < classes:
            chosen.append(label)
        if label in chosen and per_class[label] < shots:
            per_class[label] += 1
            few.append((f"{domain}-{i:06d}.{item.fmt_ext}", item.encoded, label))
        elif label in chosen and len(test) < test_images:
            test.append((item.encoded, label))
        elif len(rest) < rest_max:
            rest.append(item.encoded)
        if len(test) >= test_images and len(rest) >= rest_max and sum(per_class.values()) >= shots * classes:
            break
    return TargetSet(domain, few, test, rest)


def run_daemon(state_dir: Path, per_domain: int, args: argparse.Namespace) -> tuple[list[dict], float]:
    """Stream the domains through `tailord run` until idle; its JSON log events and wall seconds."""
    from streamer.broker import EmbeddedBroker
    from streamer.produce import produce

    started = time.perf_counter()
    with EmbeddedBroker() as broker:
        topic = "snapshot-bench"
        for domain in DOMAINS:
            produce(f"builtin:{domain}", topic, broker.bootstrap, None, per_domain, batch=16, progress=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAILORD_")}
        env.update({"TAILORD_BOOTSTRAP_SERVERS": broker.bootstrap, "TAILORD_TOPIC": topic,
                    "TAILORD_STATE_DIR": str(state_dir), "TAILORD_HTTP_PORT": "0",
                    "TAILORD_PRESET": args.preset, "TAILORD_METHOD": args.method,
                    "TAILORD_BATCH_SIZE": str(args.batch_size), "TAILORD_DEVICE": args.device,
                    "TAILORD_EXPERIENCE_IMAGES": str(max(1, int(args.experience_fraction * per_domain))),
                    "TAILORD_EXIT_WHEN_IDLE_S": str(IDLE_EXIT_S), "TAILORD_LOG_FORMAT": "json", "TAILORD_SEED": str(args.seed)})
        proc = subprocess.run([sys.executable, "-m", "deploy.cli", "run"], env=env, capture_output=True,
                              text=True, timeout=3600)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not any(e.get("event") == "stopped" for e in events):
        raise SystemExit(f"daemon failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return events, time.perf_counter() - started


def refresh_dip(events: list[dict], throughput: list[dict]) -> dict[str, Any]:
    """Index refresh seconds, and training images/s between throughput samples overlapping a refresh
    vs the others (rates from consecutive samples' `images_total`; samples are ~5 s apart)."""
    refreshes = []
    for event in events:
        if event.get("event") == "index_refreshed":
            end = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            refreshes.append((end - float(event["seconds"]), end, float(event["seconds"])))
    during, outside = [], []
    for a, b in zip(throughput, throughput[1:], strict=False):
        seconds = b["time"] - a["time"]
        if seconds <= 0 or b["images_total"] <= a["images_total"]:
            continue  # no training in this window (idle tail)
        rate = (b["images_total"] - a["images_total"]) / seconds
        overlaps = any(start < b["time"] and end > a["time"] for start, end, _ in refreshes)
        (during if overlaps else outside).append(rate)
    during_mean = statistics.mean(during) if during else None
    outside_mean = statistics.mean(outside) if outside else None
    dip = (1 - during_mean / outside_mean) if during_mean is not None and outside_mean else None
    return {"count": len(refreshes), "seconds": [r[2] for r in refreshes],
            "seconds_max": max((r[2] for r in refreshes), default=None),
            "throughput_windows_during": len(during), "throughput_windows_outside": len(outside),
            "stream_images_per_second_during": _round(during_mean),
            "stream_images_per_second_outside": _round(outside_mean),
            "dip_fraction": _round(dip, 3)}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def decode_all(encoded: list[bytes], size: int) -> torch.Tensor:
    """(N,3,size,size) uint8 with the daemon's decoder."""
    from streamer.decode import decode_image
    from streamer.limits import DecodeLimits

    limits = DecodeLimits()
    return torch.stack([decode_image(data, limits, size) for data in encoded])


def downstream(backbone: nn.Module, input_spec: dict, target: TargetSet, size: int) -> dict[str, float]:
    """kNN and linear-probe accuracy (%) on the test split, fit on the few-shot features."""
    from learners.augment import EvalTransform
    from learners.evaluation import embed, encode_labels, knn_accuracy, linear_probe_accuracy

    transform = EvalTransform(input_spec["resolution"], input_spec["mean"], input_spec["std"])
    backbone = backbone.cpu().eval()
    y, classes = encode_labels([label for *_, label in target.shots] + [label for _, label in target.test])
    y_train, y_test = y[:len(target.shots)], y[len(target.shots):]
    x_train = embed(backbone, decode_all([data for _, data, _ in target.shots], size), transform)
    x_test = embed(backbone, decode_all([data for data, _ in target.test], size), transform)
    k = min(KNN_K, len(y_train))
    knn = knn_accuracy(x_train, y_train, x_test, y_test, k=k, temperature=KNN_T, num_classes=len(classes))
    probe = linear_probe_accuracy(x_train, y_train, x_test, y_test, num_classes=len(classes))
    return {"knn": round(100 * knn, 2), "linear": round(100 * probe, 2)}


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def routing_latency_100k(args: argparse.Namespace) -> dict[str, Any]:
    """`benchmarks/routing_latency.py` at 100k vectors, 500 targets (its JSON summary)."""
    script = Path(__file__).with_name("routing_latency.py")
    proc = subprocess.run([sys.executable, str(script), "--n", str(args.latency_vectors), "--queries",
                           str(args.latency_targets), "--repeats", str(args.latency_repeats)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies --images-per-domain")
    parser.add_argument("--images-per-domain", type=int, default=300)
    parser.add_argument("--experience-fraction", type=float, default=0.8,
                        help="TAILORD_EXPERIENCE_IMAGES as a fraction of the images per domain")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=5, help="labelled target images per class")
    parser.add_argument("--classes", type=int, default=10, help="classes per domain's target set (the first seen)")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--sept-epochs", type=int, default=10, help="SSL epochs of both SEPT arms (equal steps)")
    parser.add_argument("--budget-share", type=float, default=0.05, help="SEPT budget as a share of stored samples")
    parser.add_argument("--routing-sets", type=int, default=5, help="extra unlabelled route sets per domain")
    parser.add_argument("--routing-set-size", type=int, default=20)
    parser.add_argument("--route-repeats", type=int, default=5)
    parser.add_argument("--latency-targets", type=int, default=500)
    parser.add_argument("--latency-vectors", type=int, default=100_000)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--state-dir", type=Path, default=None, help="keep the daemon's state here")
    args = parser.parse_args()

    from deploy.indexer import backbone_from_checkpoint, experience_checkpoints
    from deploy.snapshots import SnapshotEngine
    from learners.snapshot import load_snapshot

    wall = time.perf_counter()
    torch.manual_seed(args.seed)
    per_domain = max(1, round(args.images_per_domain * args.scale))
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = args.state_dir or Path(tmp) / "state"
        say(f"streaming {per_domain} images per domain through the daemon")
        events, daemon_seconds = run_daemon(state_dir, per_domain, args)
        stopped = [e for e in events if e.get("event") == "stopped"][-1]
        history = json.loads((state_dir / "metrics" / "history.json").read_text())
        exp_domain = {int(r["experience"]): r["domain"] for r in history["records"]}
        refresh = refresh_dip(events, history.get("throughput", []))
        say(f"daemon done in {daemon_seconds:.0f} s; experiences {exp_domain}")

        extra = args.routing_sets * args.routing_set_size
        targets = {d: held_out(d, per_domain, args.shots, args.classes, args.test_images,
                               max(extra, args.latency_targets if d == "fashion" else 0)) for d in DOMAINS}
        engine = SnapshotEngine.open_offline(state_dir, args.device)
        try:
            checkpoints = experience_checkpoints(state_dir / "checkpoints")
            latest = max(checkpoints)
            encoder_version = engine.index.current_version
            stored = len(engine.store.sample_ids(probe=False))
            budget = max(2, int(args.budget_share * stored))
            latest_backbone, latest_manifest = backbone_from_checkpoint(checkpoints[latest], "cpu")
            size = engine.decode_size
            create_seconds: dict[str, list[float]] = {arm: [] for arm in ARMS[1:]}
            routed: dict[str, list[bool]] = {"unlabelled": [], "labelled": []}
            per_domain_results: dict[str, Any] = {}

            def create(strategy: str, target_list: list[tuple[str, bytes]], labels: dict[str, str] | None,
                       name: str) -> dict[str, Any]:
                started = time.perf_counter()
                manifest = engine.create(target_list, labels, strategy,
                                         budget if "sept" in strategy else None, name, epochs=args.sept_epochs)
                create_seconds[strategy].append(time.perf_counter() - started)
                return manifest

            for domain, target in targets.items():
                say(f"{domain}: {len(target.shots)} shots, {len(target.test)} test images")
                target_list = [(f, data) for f, data, _ in target.shots]
                labels = {f: label for f, _, label in target.shots}
                result: dict[str, Any] = {"shots": len(target.shots), "test": len(target.test),
                                          "latest": downstream(latest_backbone, latest_manifest["input"], target,
                                                               size)}
                for strategy in ARMS[1:]:
                    manifest = create(strategy, target_list, labels, f"{domain}-{strategy.replace('+', '-')}")
                    backbone = load_snapshot(state_dir / "snapshots" / manifest["name"])
                    chosen = manifest["chosen_experience"]
                    result[strategy] = {**downstream(backbone, manifest["input"], target, size),
                                        "chosen_experience": chosen, "chosen_domain": exp_domain.get(chosen),
                                        "retrieved_count": manifest["retrieved_count"],
                                        "retrieved_share": round(manifest["retrieved_share"], 4),
                                        "sept_steps": manifest["sept_steps"],
                                        "seconds": manifest["seconds"]}
                    if strategy != "sept":
                        routed["labelled"].append(exp_domain.get(chosen) == domain)
                for i in range(args.routing_sets):
                    chunk = target.rest[i * args.routing_set_size:(i + 1) * args.routing_set_size]
                    if chunk:
                        manifest = create("route", [(f"r{j}.img", d) for j, d in enumerate(chunk)], None,
                                          f"{domain}-routing-{i}")
                        routed["unlabelled"].append(exp_domain.get(manifest["chosen_experience"]) == domain)
                per_domain_results[domain] = result

            say(f"route latency: {args.route_repeats} x {args.latency_targets} fashion targets")
            latency_targets = [(f"l{j}.img", d) for j, d in enumerate(targets["fashion"].rest[:args.latency_targets])]
            route_seconds = []
            for i in range(args.route_repeats):
                started = time.perf_counter()
                create("route", latency_targets, None, f"latency-{i}")
                route_seconds.append(time.perf_counter() - started)
        finally:
            engine.close()

    say("100k-vector routing latency (benchmarks/routing_latency.py)")
    synthetic = routing_latency_100k(args)

    means = {arm: {metric: round(statistics.mean(per_domain_results[d][arm][metric] for d in DOMAINS), 2)
                   for metric in ("knn", "linear")} for arm in ARMS}
    shares = [per_domain_results[d]["route+sept"]["retrieved_share"] for d in DOMAINS]
    gain_knn = means["route+sept"]["knn"] - means["latest"]["knn"]
    gain_linear = means["route+sept"]["linear"] - means["latest"]["linear"]
    routing = {kind: {"accuracy": _round(sum(v) / len(v), 4) if v else None, "sets": len(v)}
               for kind, v in routed.items()}
    routing_accuracy = routing["unlabelled"]["accuracy"]
    # The daemon's index stays exact (flat) up to TAILORD_INDEX_EXACT_MAX (200k): flat is the default at 100k.
    synthetic_p50_s = synthetic["flat"]["p50_ms"] / 1000 if "flat" in synthetic else None
    ivf_p50_s = synthetic["ivf"]["p50_ms"] / 1000 if "ivf" in synthetic else None
    print(json.dumps({
        "benchmark": "snapshot",
        "accuracy_mean": means,
        "per_domain": per_domain_results,
        "route_sept_gain_points": {"knn": round(gain_knn, 2), "linear": round(gain_linear, 2)},
        "retrieved_share_max": max(shares), "retrieved_budget": budget, "stored_samples": stored,
        "routing": {**routing, "experience_domains": {str(k): v for k, v in exp_domain.items()}},
        "latency": {
            "create_seconds": {arm: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)}
                               for arm, v in create_seconds.items()},
            "route_real": {"targets": len(latency_targets), "stored_vectors": stored,
                           "p50": percentile(route_seconds, 50), "p95": percentile(route_seconds, 95)},
            "route_100k_synthetic": synthetic,
        },
        "index_refresh": {**refresh, "aborted": sum(e.get("event") == "index_refresh_aborted" for e in events),
                          "live_encoder_version": encoder_version},
        "daemon": {"seconds": round(daemon_seconds, 1), "images_per_second": stopped.get("images_per_second_overall"),
                   "images_total": stopped.get("images_total"), "experiences": len(checkpoints),
                   "latest_experience": latest},
        "targets": {
            "routing_ge_95pct": routing_accuracy is not None and routing_accuracy >= TARGETS["routing_accuracy_min"],
            "route_sept_ge_latest_plus_5_knn": gain_knn >= TARGETS["route_sept_gain_points_min"]
            and max(shares) <= TARGETS["retrieved_share_max"],
            "route_sept_ge_latest_plus_5_linear": gain_linear >= TARGETS["route_sept_gain_points_min"]
            and max(shares) <= TARGETS["retrieved_share_max"],
            "route_p50_lt_1s_500_targets_100k": synthetic_p50_s is not None
            and synthetic_p50_s < TARGETS["route_p50_seconds_max"],
            "route_p50_lt_1s_500_targets_100k_ivf": ivf_p50_s is not None
            and ivf_p50_s < TARGETS["route_p50_seconds_max"],
        },
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "images_per_domain_streamed": per_domain, "torch_threads": torch.get_num_threads(),
                   "loadavg_1m": os.getloadavg()[0]},
    }))


if __name__ == "__main__":
    main()
