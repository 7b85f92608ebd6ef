"""Which experience checkpoint serves each held-out task best, and does routing pick it?

`benchmarks/snapshot.py` scores routing by domain: a set is routed right when the chosen
experience streamed the task's domain. For targets from a different source of a streamed kind
(``digits-opencv``: OpenCV's handwritten digits, thin sharp strokes framed like Fashion-MNIST,
where the streamed ``digits`` are scikit-learn's blurred 8x8 ones) the domain and the best
backbone need not agree. This benchmark measures both, with the snapshot benchmark's stream,
tasks and probes (its `SeedRun.stream` and `routing_sets`, `draw_targets`, `few_shot_scores`):

1. per seed, the four domains streamed through `tailord run` (header boundaries), as there;
2. per task, every experience checkpoint's 5- and 20-shot kNN and linear-probe accuracy on
   the task's test split (no training: the checkpoint as routing would hand it over);
3. the task's routing sets routed without and with labels (`SnapshotEngine.create`, `route`);
4. per task over seeds: each domain's checkpoint's mean score, the best domain, the domains
   routing chose, and the regret: the best checkpoint's 5-shot kNN minus the chosen one's.

The last line printed is one JSON object; progress goes to stderr. Run:
``python -m benchmarks.routing_fit`` (~3 min per seed on 2 idle cores).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.snapshot import (  # noqa: E402
    TASKS,
    SeedRun,
    draw_targets,
    few_shot_scores,
    parse_args,
    say,
)


class FitRun(SeedRun):
    """One seed: the stream, then every checkpoint's scores and the routing sets of every task."""

    def run(self) -> dict[str, Any]:
        from deploy.indexer import Encoder, experience_checkpoints
        from deploy.snapshots import SnapshotEngine

        per_domain, _, _ = self.stream()
        checkpoints = experience_checkpoints(self.state_dir / "checkpoints")
        encoders = {exp: Encoder.load(exp, path, "cpu", meta=True) for exp, path in sorted(checkpoints.items())
                    if exp in self.exp_domain}
        scores: dict[str, dict[str, Any]] = {}
        self.engine = SnapshotEngine.open_offline(self.state_dir, self.args.device)
        try:
            for task in TASKS:
                target = draw_targets(task, per_domain, self.args, self.seed, 0)
                say(f"seed {self.seed}: {task.name}: every checkpoint's scores, then its routing sets")
                scores[task.name] = {self.exp_domain[exp]: few_shot_scores(enc.backbone, enc.manifest["input"],
                                                                            target, self.engine.decode_size)
                                     for exp, enc in encoders.items()}
                self.routing_sets(target)
        finally:
            self.engine.close()
        return {"seed": self.seed, "checkpoint_scores": scores, "routing": self.routed}


def regret(scores: dict[str, dict[str, Any]], chosen: str | None, shots: str = "5-shot") -> float | None:
    """The best checkpoint's kNN accuracy minus the chosen one's (points), None if nothing was chosen."""
    if chosen not in scores:
        return None
    return max(s[shots]["knn"] for s in scores.values()) - scores[chosen][shots]["knn"]


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per task over seeds: mean scores by checkpoint domain, the best domain, routing's choices and regret."""
    summary: dict[str, Any] = {}
    for task in TASKS:
        per_domain: dict[str, dict[str, list[float]]] = {}
        for run in runs:
            for domain, score in run["checkpoint_scores"][task.name].items():
                for shots, pair in score.items():
                    for probe, value in pair.items():
                        per_domain.setdefault(domain, {}).setdefault(f"{shots} {probe}", []).append(value)
        means = {d: {k: round(statistics.mean(v), 2) for k, v in metrics.items()} for d, metrics in per_domain.items()}
        best = max(means, key=lambda d: means[d]["5-shot knn"]) if means else None
        routed: dict[str, Any] = {}
        for kind in ("unlabelled", "labelled"):
            checks = [(run, c) for run in runs for c in run["routing"][kind] if c["task"] == task.name]
            losses = [regret(run["checkpoint_scores"][task.name], c["chosen"]) for run, c in checks]
            losses = [v for v in losses if v is not None]
            routed[kind] = {"chosen": {d: sum(c["chosen"] == d for _, c in checks) for d in means},
                            "domain_correct": round(sum(c["correct"] for _, c in checks) / len(checks), 3)
                            if checks else None,
                            "regret_5shot_knn": round(statistics.mean(losses), 2) if losses else None}
        summary[task.name] = {"kind": task.kind, "domain": task.domain, "checkpoint_means": means,
                              "best_checkpoint": best, "routing": routed}
    return summary


def main() -> None:
    args = parse_args(description=__doc__.splitlines()[0])  # the snapshot benchmark's: --seeds, --scale, ...
    wall = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            runs.append(FitRun(args, seed, (args.state_dir or Path(tmp)) / f"seed-{seed}").run())
    summary = summarize(runs)
    for name, task in summary.items():
        say(f"{name}: best {task['best_checkpoint']}; unlabelled routing chose {task['routing']['unlabelled']['chosen']}"
            f", regret {task['routing']['unlabelled']['regret_5shot_knn']}")
    print(json.dumps({"benchmark": "routing_fit", "tasks": summary, "runs": runs,
                      "wall_seconds": round(time.perf_counter() - wall, 1),
                      "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
