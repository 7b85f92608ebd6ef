"""Server time of the status page (`GET /`) on a large state: 50 experiences, 20 snapshots.

Builds a History with 50 rows of R (kNN and linear), floors and CKA, 2,000 throughput points,
and 20 snapshot manifests on disk, then times `deploy.status_page` reading the snapshots
(`list_snapshots`) and rendering (`render`). Prints one JSON line; the target is < 200 ms.

Run: ``python benchmarks/status_page.py [--repeats 20]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from deploy.evaluate import EvalRow
from deploy.history import History
from deploy.status_page import PageData, list_snapshots, render

EXPERIENCES = 50
SNAPSHOTS = 20
THROUGHPUT_POINTS = 2000
START = 1_800_000_000.0


def large_history() -> History:
    """50 finished experiences with every matrix filled and both floors per probe set."""
    history = History()
    for e in range(1, EXPERIENCES + 1):
        row = [0.5 + 0.01 * ((e * j) % 40) for j in range(1, e + 1)]
        floors = {"pixels": {"knn": 0.6, "linear": 0.7}, "untrained": {"knn": 0.55, "linear": 0.65},
                  "k": 20, "chance": 0.1, "classes": 10, "scored": 400, "folds": 5}
        history.add_row(e, EvalRow(row, row, [0.9] * e, [4.0] * e), floors,
                        {"domain": f"domain-{e % 7}", "images": 2000, "images_total": 2000 * e,
                         "time": START + 600 * e, "images_per_second": 250.0})
    return history


def write_snapshots(root: Path) -> None:
    for i in range(SNAPSHOTS):
        folder = root / f"snap-{i:02d}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps(
            {"name": folder.name, "strategy": "route+sept", "chosen_experience": i % EXPERIENCES + 1,
             "retrieved_count": 2048, "target_count": 40, "created_at": START + 60 * i}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    history = large_history()
    throughput = [{"time": START + 15 * k, "images_per_second": 240 + k % 30, "images_total": 3600 * k}
                  for k in range(THROUGHPUT_POINTS)]
    status = {"experience": EXPERIENCES + 1, "domain": "domain-1", "images_total": 100_000, "topic": "bench"}
    seconds, size = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        write_snapshots(Path(tmp))
        for _ in range(args.repeats):
            started = time.perf_counter()
            snapshots, count = list_snapshots(Path(tmp))
            page = render(PageData(now=START + 40_000, status=status, history=history, throughput=throughput,
                                   snapshots=snapshots, snapshot_count=count))
            seconds.append(time.perf_counter() - started)
            size = len(page.encode())
    print(json.dumps({"experiences": EXPERIENCES, "snapshots": SNAPSHOTS, "throughput_points": THROUGHPUT_POINTS,
                      "median_ms": round(1000 * statistics.median(seconds), 2),
                      "max_ms": round(1000 * max(seconds), 2), "page_bytes": size, "target_ms": 200,
                      "meets_target": statistics.median(seconds) < 0.2}))


if __name__ == "__main__":
    main()
