"""Task-tailored snapshots against what a user gets without them, on tasks nobody streamed.

Per seed (``--seeds``; the daemon's TAILORD_SEED and the target samples change with it):

1. **Stream.** An embedded broker gets ``digits -> fashion -> textures -> photos``, the first
   N items of each built-in source (N = ``--images-per-domain`` x ``--scale``), and
   ``tailord run`` consumes them until idle. Experiences end at a domain change; a few
   images under an ``end-of-stream`` domain close the last one (the daemon does not close
   the running experience when it exits), so every domain gets its checkpoint.
2. **Targets**, never streamed (streamer/sources/builtin.py, "Held out"): ``digits`` (the
   scikit-learn digits after the streamed prefix), ``fashion`` (Fashion-MNIST's training
   split), ``textures`` and ``photos`` (``builtin:*-heldout``: pictures the stream leaves
   out entirely) and, from a different source of a streamed kind, ``digits-opencv``
   (OpenCV's handwritten digits; its domain is digits). Each: up to ``--classes`` classes,
   ``max(SHOTS)`` labelled shots per class (the first ``--snapshot-shots`` of each class are the
   snapshot's targets, all 20 by default), a disjoint test split
   of ``--test-per-class`` per class, and class-balanced routing sets.
3. **Arms** on the stopped daemon's state dir (``SnapshotEngine.open_offline``): ``latest``
   (the newest experience checkpoint) and ``route`` (no training); ``sept`` (from latest)
   and ``route+sept`` (the same budget and epochs, the engine's defaults or ``--budget`` and
   ``--epochs``: the same SSL steps);
   ``target-only``: the latest checkpoint's SSL continued on the target images alone for
   the same steps as ``sept`` (``deploy.sept_child.continue_checkpoint``), what a user does
   without tailord. Each backbone is scored by weighted kNN (k <= 20, T = 0.07) and a linear
   probe fit on 5 and on 20 shots per class, tested on the test split.
4. **Routing**: the chosen experience's domain equals the target's, unlabelled (the vote)
   and labelled (the vote checked by the labels), on ``--routing-sets`` sets per task and
   on the snapshot targets, same-source and different-source tasks apart.
5. **Latency** (first seed): every ``create`` timed; ``route`` snapshots of
   ``--latency-targets`` real images on this store; ``benchmarks/routing_latency.py`` at
   ``--latency-vectors`` synthetic vectors (embed-free, one FAISS thread as the daemon).

Means and sample stds are over seeds; a gap counts only when it is larger than the std
(``benchmarks.continual.at_least``). The last line printed is one JSON object; progress goes
to stderr. Run: ``python benchmarks/snapshot.py`` (~15 min on 2 idle cores), ``--quick``.
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
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.continual import at_least  # noqa: E402  the seed-std rule, one definition for both benchmarks
from learners.sept import SEPT_EPOCHS, SEPT_MAX_STEPS  # noqa: E402
from replay.retrieval import RELEVANCE_K  # noqa: E402

DOMAINS = ("digits", "fashion", "textures", "photos")
ARMS = ("latest", "route", "target-only", "sept", "route+sept")
SHOTS = (5, 20)
KNN_K, KNN_T = 20, 0.07
IDLE_EXIT_S = 20  # long enough for the last experience's index refresh to finish before the daemon exits
END_DOMAIN, END_IMAGES = "end-of-stream", 8  # their domain change ends the last domain's experience


@dataclass(frozen=True)
class TargetTask:
    """A target task: where its images come from and which streamed domain routing should pick."""

    name: str
    source: str
    domain: str
    kind: str  # "same source" | "different source"
    after_stream: bool = False  # skip the source's streamed prefix (the same builtin was streamed)


TASKS = (
    TargetTask("digits", "builtin:digits", "digits", "same source", after_stream=True),
    TargetTask("fashion", "builtin:fashion-train", "fashion", "same source"),
    TargetTask("textures", "builtin:textures-heldout", "textures", "same source"),
    TargetTask("photos", "builtin:photos-heldout", "photos", "same source"),
    TargetTask("digits-opencv", "builtin:digits-opencv", "digits", "different source"),
)


@dataclass
class TargetSet:
    """One task's images: labelled shots (class-major order), a test split, labelled routing
    images per class, and unlabelled extras (latency targets)."""

    task: TargetTask
    shots: list[tuple[str, bytes, str]] = field(default_factory=list)  # (filename, encoded, label)
    test: list[tuple[bytes, str]] = field(default_factory=list)
    routing: dict[str, list[bytes]] = field(default_factory=dict)  # class -> images
    extra: list[bytes] = field(default_factory=list)


def say(message: str) -> None:
    """Progress line on stderr (stdout's last line is the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def draw_targets(task: TargetTask, skip: int, args: argparse.Namespace, seed: int, extra_max: int) -> TargetSet:
    """Shots, test split and leftovers of `task`, drawn at random (`seed`) from its first `--pool` items
    (after the `skip` streamed ones when the task's source was streamed)."""
    from streamer.sources import open_source

    start = skip if task.after_stream else 0
    items = list(islice(open_source(task.source).items, start, start + args.pool))
    order = np.random.default_rng(seed).permutation(len(items))
    classes = sorted({str(item.label) for item in items})[:args.classes]
    by_class: dict[str, list[tuple[str, bytes, str]]] = {c: [] for c in classes}
    tests: Counter[str] = Counter()
    target = TargetSet(task, routing={c: [] for c in classes})
    for i in order:
        item, label = items[i], str(items[i].label)
        if label not in by_class:
            continue
        if len(by_class[label]) < max(SHOTS):
            by_class[label].append((f"{task.name}-{i:06d}.{item.fmt_ext}", item.encoded, label))
        elif tests[label] < args.test_per_class:
            tests[label] += 1
            target.test.append((item.encoded, label))
        elif len(target.routing[label]) < args.routing_sets * args.routing_per_class:
            target.routing[label].append(item.encoded)
        elif len(target.extra) < extra_max:
            target.extra.append(item.encoded)
    for n in range(max(SHOTS)):  # shot n of every class, then n + 1: any prefix of n x classes is n-shot
        target.shots += [by_class[c][n] for c in classes if n < len(by_class[c])]
    return target


def run_daemon(state_dir: Path, per_domain: int, args: argparse.Namespace, seed: int) -> tuple[list[dict], float]:
    """Stream the domains through `tailord run` until idle; its JSON log events and wall seconds."""
    from streamer.broker import EmbeddedBroker
    from streamer.produce import produce

    started = time.perf_counter()
    with EmbeddedBroker() as broker:
        topic = "snapshot-bench"
        for domain in DOMAINS:
            produce(f"builtin:{domain}", topic, broker.bootstrap, None, per_domain, batch=16, progress=False)
        produce("builtin:digits", topic, broker.bootstrap, END_DOMAIN, END_IMAGES, batch=END_IMAGES, progress=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAILORD_")}
        env.update({"TAILORD_BOOTSTRAP_SERVERS": broker.bootstrap, "TAILORD_TOPIC": topic,
                    "TAILORD_STATE_DIR": str(state_dir), "TAILORD_HTTP_PORT": "0",
                    "TAILORD_PRESET": args.preset, "TAILORD_METHOD": args.method,
                    "TAILORD_BATCH_SIZE": str(args.batch_size), "TAILORD_DEVICE": args.device,
                    "TAILORD_EXPERIENCE_IMAGES": str(per_domain),  # an upper bound the domains stay under
                    "TAILORD_EXIT_WHEN_IDLE_S": str(IDLE_EXIT_S), "TAILORD_LOG_FORMAT": "json",
                    "TAILORD_SEED": str(seed)})
        proc = subprocess.run([sys.executable, "-m", "deploy.cli", "run"], env=env, capture_output=True,
                              text=True, timeout=3600)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not any(e.get("event") == "stopped" for e in events):
        raise SystemExit(f"daemon failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return events, time.perf_counter() - started


def decode_all(encoded: list[bytes], size: int) -> torch.Tensor:
    """(N,3,size,size) uint8 with the daemon's decoder (`deploy.indexer.decode_images`); every image
    must decode, or shots and labels would no longer line up."""
    from deploy.indexer import decode_images
    from streamer.limits import DecodeLimits

    images, kept = decode_images(encoded, size, DecodeLimits())
    if len(kept) != len(encoded):
        raise SystemExit(f"{len(encoded) - len(kept)} target image(s) did not decode")
    return images


def few_shot_scores(backbone: nn.Module, input_spec: dict, target: TargetSet, size: int) -> dict[str, dict]:
    """kNN and linear-probe accuracy (%) on the test split, fit on n shots per class, n in SHOTS."""
    from learners.augment import EvalTransform
    from learners.evaluation import embed, encode_labels, knn_accuracy, linear_probe_accuracy

    transform = EvalTransform(input_spec["resolution"], input_spec["mean"], input_spec["std"])
    backbone = backbone.cpu().eval()
    y, classes = encode_labels([label for *_, label in target.shots] + [label for _, label in target.test])
    y_shots, y_test = y[:len(target.shots)], y[len(target.shots):]
    x_shots = embed(backbone, decode_all([data for _, data, _ in target.shots], size), transform)
    x_test = embed(backbone, decode_all([data for data, _ in target.test], size), transform)
    scores = {}
    for n in SHOTS:
        m = min(n * len(classes), len(y_shots))
        knn = knn_accuracy(x_shots[:m], y_shots[:m], x_test, y_test, k=min(KNN_K, m), temperature=KNN_T,
                           num_classes=len(classes))
        probe = linear_probe_accuracy(x_shots[:m], y_shots[:m], x_test, y_test, num_classes=len(classes))
        scores[f"{n}-shot"] = {"knn": round(100 * knn, 2), "linear": round(100 * probe, 2)}
    return scores


def target_only(checkpoint: Path, encoded: list[bytes], size: int, steps: int, device: str) -> nn.Module:
    """The latest checkpoint's SSL continued on the target images alone, for `steps` steps."""
    from deploy.sept_child import continue_checkpoint

    images = decode_all(encoded, size)
    backbone, done = continue_checkpoint(checkpoint, images, device, epochs=max(steps, 1), max_steps=steps)
    if done != steps:
        say(f"  target-only trained {done} of {steps} steps")
    return backbone


class SeedRun:
    """One seed: the daemon's stream, then every arm and routing set on its stopped state dir."""

    def __init__(self, args: argparse.Namespace, seed: int, state_dir: Path) -> None:
        self.args, self.seed, self.state_dir = args, seed, state_dir
        self.create_seconds: dict[str, list[float]] = {arm: [] for arm in ("route", "sept", "route+sept")}
        self.tag = f"r{os.getpid()}-"  # snapshot names of this run: a reused state dir keeps the last run's
        self.routed: dict[str, list[dict]] = {"unlabelled": [], "labelled": []}

    def stream(self) -> tuple[int, list[dict], float]:
        """The domains through the daemon; (images per domain, its log events, its wall seconds), and
        `exp_domain` (experience -> domain) from its history."""
        per_domain = max(1, round(self.args.images_per_domain * self.args.scale))
        if self.args.reuse_state and (self.state_dir / "checkpoints").is_dir():
            say(f"seed {self.seed}: reusing the stopped state in {self.state_dir} (no streaming)")
            events, daemon_seconds = [], 0.0
        else:
            say(f"seed {self.seed}: streaming {per_domain} images per domain through the daemon")
            events, daemon_seconds = run_daemon(self.state_dir, per_domain, self.args, self.seed)
        history = json.loads((self.state_dir / "metrics" / "history.json").read_text())
        self.exp_domain = {int(r["experience"]): r["domain"] for r in history["records"]}
        say(f"seed {self.seed}: daemon done in {daemon_seconds:.0f} s; experiences {self.exp_domain}")
        return per_domain, events, daemon_seconds

    def run(self) -> dict[str, Any]:
        from deploy.snapshots import SnapshotEngine
        from replay.index_options import IndexOptions

        args = self.args
        per_domain, events, daemon_seconds = self.stream()
        targets = [draw_targets(task, per_domain, args, self.seed,
                                args.latency_targets if task.name == "fashion" else 0) for task in TASKS]
        faiss = IndexOptions(threads=1)  # the daemon's FAISS threads
        self.engine = SnapshotEngine.open_offline(self.state_dir, args.device, faiss, relevance_k=args.relevance_k)
        try:
            scores = {target.task.name: self.score_task(target) for target in targets}
            latency = self.latency(targets) if self.seed == 0 else None
            stored = len(self.engine.store.sample_ids(probe=False))
        finally:
            self.engine.close()
        stopped = next((e for e in reversed(events) if e.get("event") == "stopped"), {})  # {}: reused
        return {"seed": self.seed, "scores": scores, "routing": self.routed, "latency": latency,
                "stored_samples": stored, "experience_domains": {str(k): v for k, v in self.exp_domain.items()},
                "daemon": {"reused": not events, "seconds": round(daemon_seconds, 1), "images_total": stopped.get("images_total"),
                           "images_per_second": stopped.get("images_per_second_overall")}}

    def create(self, strategy: str, targets: list[tuple[str, bytes]], labels: dict[str, str] | None,
               name: str) -> dict[str, Any]:
        started = time.perf_counter()
        budget = self.args.budget if "sept" in strategy else None
        manifest = self.engine.create(targets, labels, strategy, budget, self.tag + name, epochs=self.args.epochs)
        self.create_seconds[strategy].append(time.perf_counter() - started)
        return manifest

    def score_task(self, target: TargetSet) -> dict[str, Any]:
        """Every arm's few-shot scores on `target`, and its routing sets."""
        from deploy.indexer import backbone_from_checkpoint, experience_checkpoints
        from learners.snapshot import load_snapshot

        task, size = target.task, self.engine.decode_size
        classes = len({label for *_, label in target.shots})
        shots = target.shots[:self.args.snapshot_shots * classes]  # class-major: N per class
        say(f"seed {self.seed}: {task.name}: {len(target.shots)} shots ({len(shots)} the snapshots' targets), "
            f"{len(target.test)} test images")
        target_list = [(f, data) for f, data, _ in shots]
        labels = {f: label for f, _, label in shots}
        checkpoints = experience_checkpoints(self.state_dir / "checkpoints")
        latest, manifest = backbone_from_checkpoint(checkpoints[max(checkpoints)], "cpu")
        result: dict[str, Any] = {"latest": few_shot_scores(latest, manifest["input"], target, size)}
        for strategy in ("route", "sept", "route+sept"):
            made = self.create(strategy, target_list, labels, f"s{self.seed}-{task.name}-{strategy.replace('+', '-')}")
            backbone = load_snapshot(self.state_dir / "snapshots" / made["name"])
            chosen = made["chosen_experience"]
            result[strategy] = {**few_shot_scores(backbone, made["input"], target, size),
                                "chosen_domain": self.exp_domain.get(chosen), "retrieved": made["retrieved_count"],
                                "sept_steps": made["sept_steps"], "seconds": made["seconds"]}
            if strategy == "route":
                self.route_check("labelled", task, made, "snapshot targets")
        steps = result["sept"]["sept_steps"]
        own = target_only(checkpoints[max(checkpoints)], [data for _, data in target_list], size, steps,
                          self.args.device)
        result["target-only"] = {**few_shot_scores(own, manifest["input"], target, size), "sept_steps": steps}
        self.routing_sets(target)
        return result

    def routing_sets(self, target: TargetSet) -> None:
        """Route `--routing-sets` class-balanced sets (`--routing-per-class` images of every class,
        so labels can be scored leave-one-out), without and with their labels."""
        per = self.args.routing_per_class
        for i in range(self.args.routing_sets):
            chunk = [(images[i * per + j], label) for label, images in target.routing.items()
                     for j in range(per) if i * per + j < len(images)]
            if len(chunk) < per * len(target.routing):
                break
            files = [(f"r{j}.img", data) for j, (data, _) in enumerate(chunk)]
            labels = {f"r{j}.img": label for j, (_, label) in enumerate(chunk)}
            for kind, given in (("unlabelled", None), ("labelled", labels)):
                made = self.create("route", files, given, f"s{self.seed}-{target.task.name}-{kind}-{i}")
                self.route_check(kind, target.task, made, f"routing set {i}")

    def route_check(self, kind: str, task: TargetTask, made: dict, what: str) -> None:
        """Record where a snapshot routed and the manifest's candidates (the vote and, with labels,
        their scores), so a routing rule can be judged on the very sets it routed."""
        chosen = self.exp_domain.get(made["chosen_experience"])
        candidates = [{"domain": self.exp_domain.get(c["experience"]),
                       **{key: c[key] for key in ("vote_share", "knn_accuracy", "z_over_top_vote") if key in c}}
                      for c in made["candidates"]]
        self.routed[kind].append({"task": task.name, "kind": task.kind, "what": what, "chosen": chosen,
                                  "correct": chosen == task.domain, "candidates": candidates})

    def latency(self, targets: list[TargetSet]) -> dict[str, Any]:
        """`create` p50/p95 per strategy, and route snapshots of `--latency-targets` real images."""
        fashion = next(t for t in targets if t.task.name == "fashion")
        files = [(f"l{j}.img", data) for j, data in enumerate(fashion.extra)]
        route_seconds = []
        for i in range(self.args.route_repeats):
            started = time.perf_counter()
            self.create("route", files, None, f"latency-{i}")
            route_seconds.append(time.perf_counter() - started)
        return {"create_seconds": {arm: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)}
                                   for arm, v in self.create_seconds.items()},
                "route_real": {"targets": len(files), "stored_vectors": len(self.engine.store.sample_ids(probe=False)),
                               "p50": percentile(route_seconds, 50), "p95": percentile(route_seconds, 95)}}


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def routing_latency_100k(args: argparse.Namespace) -> dict[str, Any]:
    """`benchmarks/routing_latency.py` at `--latency-vectors`, `--latency-targets` queries (its JSON),
    with one FAISS thread as the daemon's index (`TAILORD_INDEX_THREADS`, and the arms' engine here)."""
    script = Path(__file__).with_name("routing_latency.py")
    proc = subprocess.run([sys.executable, str(script), "--n", str(args.latency_vectors), "--queries",
                           str(args.latency_targets), "--repeats", str(args.latency_repeats), "--threads", "1"],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr[-1000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- summaries over seeds

def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample std (0 with one value) of per-seed values, and the values."""
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "per_seed": [round(v, 2) for v in values]}


def task_groups() -> dict[str, list[str]]:
    """Which tasks each mean covers: all, and same- or different-source ones apart."""
    groups = {"all": [t.name for t in TASKS]}
    for kind in ("same source", "different source"):
        groups[kind] = [t.name for t in TASKS if t.kind == kind]
    return groups


def summarize_scores(runs: list[dict]) -> dict[str, Any]:
    """Per task and per task group: each arm's score at each shot count and read-out, over seeds."""
    shot_keys = [f"{n}-shot" for n in SHOTS]

    def over_seeds(names: list[str], arm: str, shots: str, metric: str) -> dict[str, Any]:
        return mean_std([statistics.mean(r["scores"][t][arm][shots][metric] for t in names) for r in runs])

    def table(names: list[str]) -> dict[str, Any]:
        return {arm: {shots: {metric: over_seeds(names, arm, shots, metric) for metric in ("knn", "linear")}
                      for shots in shot_keys} for arm in ARMS}

    return {"per_task": {task.name: table([task.name]) for task in TASKS},
            "means": {group: table(names) for group, names in task_groups().items()}}


def summarize_routing(runs: list[dict]) -> dict[str, Any]:
    """Routing accuracy over all seeds, unlabelled and labelled, per task kind and per task, and
    how many sets went against the vote (labels overturned it)."""
    selectors = {"all": lambda c: True}
    selectors.update({k: (lambda c, k=k: c["kind"] == k) for k in ("same source", "different source")})
    selectors.update({t.name: (lambda c, n=t.name: c["task"] == n) for t in TASKS})
    summary: dict[str, Any] = {}
    for kind in ("unlabelled", "labelled"):
        checks = [c for r in runs for c in r["routing"][kind]]
        summary[kind] = {}
        for key, selector in selectors.items():
            chosen = [c for c in checks if selector(c)]
            summary[kind][key] = {"accuracy": round(sum(c["correct"] for c in chosen) / len(chosen), 4)
                                  if chosen else None,
                                  "sets": len(chosen), "chosen": dict(Counter(str(c["chosen"]) for c in chosen)),
                                  "against_vote": sum(c["chosen"] != c["candidates"][0]["domain"] for c in chosen)}
    return summary


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The gap a - b seed by seed (both arms start from the same daemon and targets in a seed),
    mean and std: shown beside the target, which stays judged on the arms' own seed std."""
    return mean_std([x - y for x, y in zip(a["per_seed"], b["per_seed"], strict=True)])


def check_targets(means: dict[str, Any], routing: dict[str, Any], latency: dict[str, Any] | None,
                  synthetic: dict[str, Any]) -> dict[str, Any]:
    """Issue #14's targets: means over all target tasks at 5 shots, gaps beyond the seed std."""
    arms = means["all"]
    checks: dict[str, Any] = {}
    for metric in ("knn", "linear"):
        a, latest, own = (arms[arm]["5-shot"][metric] for arm in ("route+sept", "latest", "target-only"))
        checks[f"route_sept_ge_latest_plus_3_{metric}"] = {
            **at_least(a["mean"], latest["mean"], 3.0, max(a["std"], latest["std"])), "paired": paired(a, latest)}
        checks[f"route_sept_ge_target_only_plus_1_{metric}"] = {
            **at_least(a["mean"], own["mean"], 1.0, max(a["std"], own["std"])), "paired": paired(a, own)}
    for kind, need in (("unlabelled", 0.95), ("labelled", 0.90)):
        for source in ("same source", "different source"):
            accuracy = routing[kind][source]["accuracy"]
            checks[f"routing_{kind}_{source.replace(' ', '_')}"] = {
                "accuracy": accuracy, "sets": routing[kind][source]["sets"], "need": need,
                "passed": accuracy is not None and accuracy >= need}
    flat = synthetic.get("flat", {}).get("p50_ms")
    checks["route_p50_lt_1s_synthetic_flat"] = {"p50_s": flat and flat / 1000, "passed": bool(flat and flat < 1000)}
    if latency is not None:
        p50 = latency["route_real"]["p50"]
        checks["route_p50_lt_1s_real_small_store"] = {"p50_s": p50, "passed": p50 is not None and p50 < 1.0}
    checks["all_passed"] = all(c["passed"] for c in checks.values())
    return checks


def markdown_table(means: dict[str, Any]) -> str:
    """Arms by task group: 5-shot and 20-shot kNN / linear, mean +- std over seeds."""
    lines = ["| tasks | arm | 5-shot kNN | 5-shot linear | 20-shot kNN | 20-shot linear |",
             "|---|---|---|---|---|---|"]
    for group, arms in means.items():
        for arm, by_shots in arms.items():
            cells = [f"{by_shots[s][m]['mean']:.1f} ± {by_shots[s][m]['std']:.1f}"
                     for s in ("5-shot", "20-shot") for m in ("knn", "linear")]
            lines.append(f"| {group} | `{arm}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """This benchmark's options (also `benchmarks/routing_fit.py`'s, with its own `description`)."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs, seeds 0..N-1 (daemon seed and target draws)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies --images-per-domain")
    parser.add_argument("--images-per-domain", type=int, default=300)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=int, default=None,
                        help="SEPT's retrieval budget for both SEPT arms (default: the engine's, 5 %% of the store "
                             "and at most a third of the targets, within 64-2,000)")
    parser.add_argument("--epochs", type=int, default=SEPT_EPOCHS,
                        help="SEPT's passes over the targets and retrieved samples for both SEPT arms (capped at "
                             f"{SEPT_MAX_STEPS} steps; `target-only` takes as many steps as `sept`)")
    parser.add_argument("--relevance-k", type=int, default=RELEVANCE_K,
                        help="the engine's k of the targets' k-NN manifold SEPT's retrieved samples must lie in "
                             "(TAILORD_SNAPSHOT_RELEVANCE_K); 0: all retrieved")
    parser.add_argument("--snapshot-shots", type=int, default=max(SHOTS),
                        help="labelled shots per class given to the snapshots as targets (the probes still fit 5 and 20)")
    parser.add_argument("--classes", type=int, default=10, help="classes per target task at most")
    parser.add_argument("--test-per-class", type=int, default=20, help="test images per class")
    parser.add_argument("--pool", type=int, default=3000, help="target images are drawn from a task's first N items")
    parser.add_argument("--routing-sets", type=int, default=5, help="routing sets per task and seed")
    parser.add_argument("--routing-per-class", type=int, default=2, help="images of each class per routing set")
    parser.add_argument("--route-repeats", type=int, default=5)
    parser.add_argument("--latency-targets", type=int, default=500)
    parser.add_argument("--latency-vectors", type=int, default=100_000)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--state-dir", type=Path, default=None, help="keep each seed's state in DIR/seed-N")
    parser.add_argument("--reuse-state", action="store_true",
                        help="with --state-dir: score the arms again on a seed's kept state, without streaming (a "
                             "paired comparison of engine options on the same daemons)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run for a look: 1 seed, 100 images per domain, 1 routing set, small latency runs")
    args = parser.parse_args(argv)
    if args.reuse_state and args.state_dir is None:
        parser.error("--reuse-state needs --state-dir")
    if args.quick:
        args.seeds, args.images_per_domain, args.routing_sets, args.route_repeats = 1, 100, 1, 1
        args.latency_targets, args.latency_vectors, args.latency_repeats = 50, 2000, 1
    return args


def main() -> None:
    args = parse_args()
    wall = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            state_dir = (args.state_dir or Path(tmp)) / f"seed-{seed}"
            runs.append(SeedRun(args, seed, state_dir).run())
    say("routing latency at scale (benchmarks/routing_latency.py)")
    synthetic = routing_latency_100k(args)
    scores, routing = summarize_scores(runs), summarize_routing(runs)
    latency = runs[0]["latency"]
    say("means over seeds (percent):\n" + markdown_table(scores["means"]))
    targets = check_targets(scores["means"], routing, latency, synthetic)
    say("targets: " + ", ".join(f"{k} {'met' if v['passed'] else 'MISSED'}"
                                for k, v in targets.items() if isinstance(v, dict)))
    print(json.dumps({
        "benchmark": "snapshot", "tasks": [vars(t) for t in TASKS], "arms": list(ARMS),
        **scores, "routing": routing, "targets": targets,
        "latency": {**(latency or {}), "route_synthetic": synthetic},
        "seeds": [{**{k: r[k] for k in ("seed", "stored_samples", "experience_domains", "daemon")},
                   "routed": r["routing"]} for r in runs],
        "per_seed_scores": [r["scores"] for r in runs],
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "shots": list(SHOTS), "knn_k_max": KNN_K, "knn_temperature": KNN_T,
                   "torch_threads": torch.get_num_threads(), "loadavg_1m": os.getloadavg()[0]},
    }))


if __name__ == "__main__":
    main()
