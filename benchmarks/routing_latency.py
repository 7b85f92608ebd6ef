"""Embed-free routing latency: FAISS search + experience votes for a batch of target vectors.

Synthetic store: ``--n`` unit vectors (default 100k, dim 256) around one centre
per experience; ``--queries`` targets drawn near one experience; k neighbours
each. Times ``route(index.search(targets, k))`` for the exact (flat) index and
IVF, reports p50/p95, IVF recall@k against exact and whether both route to the
same experience. The last line printed is one JSON object.

    .venv/bin/python benchmarks/routing_latency.py [--n 100000 --dim 256 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from replay.index import VectorIndex
from replay.index_options import IndexOptions
from replay.routing import route


def synthetic(
    n: int, dim: int, experiences: int, queries: int, seed: int
) -> tuple[np.ndarray, list[int], np.ndarray, int]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(experiences, dim)).astype(np.float32)
    exps = rng.integers(0, experiences, n)
    vectors = centres[exps] + rng.normal(size=(n, dim)).astype(np.float32)
    target_exp = experiences // 2
    targets = centres[target_exp] + rng.normal(size=(queries, dim)).astype(np.float32)
    return vectors, exps.tolist(), targets, target_exp


def measure(index: VectorIndex, targets: np.ndarray, k: int, repeats: int) -> dict:
    route(*index.search(targets, k)[::2])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = index.search(targets, k)
        ranked = route(result.scores, result.experiences)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "top_experience": ranked[0][0],
        "top_share": round(ranked[0][1], 4),
        "ids": result.sample_ids,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--experiences", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0: default)")
    parser.add_argument("--gpu", action="store_true", help="search GPU copies (TAILORD_INDEX_GPU) when faiss has a GPU")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    vectors, exps, targets, target_exp = synthetic(
        args.n, args.dim, args.experiences, args.queries, args.seed
    )
    ids = [f"s{i}" for i in range(args.n)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, exact_max in (("flat", args.n), ("ivf", 0)):
            index = VectorIndex(Path(tmp), args.dim, IndexOptions(exact_max=exact_max, nprobe=args.nprobe,
                                                                   gpu=args.gpu))
            start = time.perf_counter()
            index.swap(index.build(1, vectors, ids, exps))
            build_s = time.perf_counter() - start
            assert index.kind == kind
            results[kind] = measure(index, targets, args.k, args.repeats)
            results[kind]["build_s"] = round(build_s, 2)
            print(f"{kind}: {results[kind]['p50_ms']} ms p50, {results[kind]['p95_ms']} ms p95")

    exact, approx = results["flat"].pop("ids"), results["ivf"].pop("ids")
    recall = np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)])
    summary = {
        "benchmark": "routing_latency",
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "nprobe": args.nprobe,
        "repeats": args.repeats,
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_gpus": faiss.get_num_gpus() if args.gpu and hasattr(faiss, "get_num_gpus") else 0,
        "target_experience": target_exp,
        "flat": results["flat"],
        "ivf": results["ivf"],
        "ivf_recall_at_k": round(float(recall), 4),
        "same_route": results["flat"]["top_experience"] == results["ivf"]["top_experience"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
